"""benchmarks/gpu.py: its CPU dry run goes through every part's code path; without CUDA the real run refuses.

CI has no GPU, so the GPU benchmark is checked here the only way it can be: tiny models, batch 2, fp32 on
CPU. Time boxes are scaled up so that a loaded machine cannot cut a part short; nothing is asserted
about speed.
"""
import json

import pytest
import torch

from benchmarks import gpu

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_covers_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # latency tables go to a fresh cache
    assert gpu.main(["--dry-run", "--out-dir", str(tmp_path), "--budget-scale", "20"]) == 0
    data = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert data["run"]["dry"] and data["run"]["device"] == "cpu" and data["run"]["batch"] == 2
    assert data["info"]["torch"] == torch.__version__ and data["info"]["command"]
    parts = data["parts"]
    names = [m[0] for m in gpu.DRY_MODELS]

    by = {(r["model"], r.get("variant")): r for r in parts["depgraph"]}
    for name in names:
        for variant in ("dense", "hf_prune_macs", "hf_prune_latency", "hf_prune_latency_measured"):
            row = by[(name, variant)]
            assert "error" not in row and row["ms"] > 0, row
        assert by[(name, "hf_prune_macs")]["macs_ratio"] <= 0.5
        plan = by[(name, "hf_prune_latency")]
        assert plan["plan"]["verified"] and 0 < plan["plan_measured"] and plan["macs_ratio"] < 1
        assert plan["plan"]["batch_size"] == 2 and plan["plan"]["dtype"] == "float32"
    assert by[("convnext_atto", "hf_prune_latency")]["plan"]["memory_format"] == "channels_last"
    assert by[("convnext_atto", "hf_prune_latency")]["plan"]["clock"] == "thread"  # one CPU thread: its CPU time

    merged = {(r["model"], r["variant"]): r for r in parts["updp"]}
    for name in names:
        ratios = [merged[(name, f"merged-{k}")]["macs_ratio"] for k in (1, 2)]
        assert ratios[0] > ratios[1] and ratios[0] < 1 and merged[(name, "merged-2")]["ms"] > 0

    semi = {(r["model"], r["variant"]): r for r in parts["semi24"]}
    assert all("needs CUDA" in semi[(n, "2:4")]["note"] and semi[(n, "2:4")]["ms"] > 0 for n in names)

    (fsdp,) = parts["fsdp2"]
    assert fsdp["steps"] >= 1 and (fsdp["ok"] or fsdp["error"])  # sharded, and at least one step trained
    md = (tmp_path / "gpu_dry_run.md").read_text()
    assert "DRY RUN" in md and "## fsdp2" in md and "time boxes" in md


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())
