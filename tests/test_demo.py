"""The built-in demo in quick mode: real MNIST digits, a transformers ViT and ConvNeXt trained,
pruned to half their MACs with DepGraph, fine-tuned, saved and reloaded."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from hf_prune.cli.main import main
from hf_prune.cli.demo import QUICK


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``hf-prune demo --quick --json`` once, in process: (result, log, out_dir)."""
    out_dir = tmp_path_factory.mktemp("demo")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # the demo runs on one thread by default (two oversubscribe a busy 2-core machine)
        code = main(["demo", "--quick", "--output", str(out_dir), "--json"])
    assert code == 0, err.getvalue()[-2000:]
    return json.loads(out.getvalue()), err.getvalue(), out_dir


def test_quick_demo_prunes_and_recovers(demo):
    result, _, _ = demo
    assert result["quick"] is True and result["target_macs"] == 0.5
    assert result["threads"] == 1
    assert set(result["models"]) == {"vit", "convnext"}
    for name, r in result["models"].items():
        assert not r.get("error"), f"{name}: {r.get('error')}"
        # half the MACs (DependencyGraph.macs, attention included), fewer parameters
        assert 0.40 <= r["macs_ratio"] <= 0.5 + 0.01, (name, r["macs_ratio"])
        assert r["pruned"]["macs"] < r["dense"]["macs"]
        assert r["pruned"]["params"] < r["dense"]["params"]
        # accuracies are fractions; chance is 0.1 on ten digits
        for key in ("acc_dense", "acc_pruned", "acc_finetuned"):
            assert 0.0 <= r[key] <= 1.0
        assert r["acc_dense"] > 0.5, (name, r["acc_dense"])
        assert r["acc_finetuned"] > 0.5, (name, r["acc_finetuned"])
        # fine-tuning recovers what pruning cost
        assert r["acc_finetuned"] >= r["acc_pruned"] - 0.02, name
        # measured latency is reported next to MACs
        assert r["dense"]["latency_ms"] > 0 and r["pruned"]["latency_ms"] > 0
        assert math.isclose(r["speedup"], r["dense"]["latency_ms"] / r["pruned"]["latency_ms"])
        u = r["updp"]  # UPDP from the same trained dense model, same fine-tuning budget (the CNN)
        if name == "convnext":
            assert not u.get("error"), u.get("error")
            assert u["blocks_merged"] >= 1 and u["macs"] < r["dense"]["macs"] and u["latency_ms"] > 0
            assert u["acc_finetuned"] > 0.5, (name, u["acc_finetuned"])
        assert r["budget"] == {**QUICK[name].__dict__}


def test_quick_demo_prints_tables(demo):
    result, log, _ = demo
    for title in ("ViT", "ConvNeXt"):
        assert f"== {title}:" in log
    for row in ("params", "MACs / image", "CPU latency, batch 32", "val accuracy", "after fine-tuning",
                "summary", "UPDP"):
        assert row in log
    assert result["models"]["vit"]["model"] == "ViTForImageClassification"
    assert result["models"]["convnext"]["model"] == "ConvNextForImageClassification"


def test_quick_demo_saves_and_reloads_identically(demo):
    result, log, out_dir = demo
    assert log.count("reload check: identical outputs") == 2
    for name, r in result["models"].items():
        assert r["reload_identical"] is True
        assert (out_dir / name / "config.json").exists()
        assert (out_dir / name / "model.safetensors").exists()
        card = (out_dir / name / "README.md").read_text()
        assert f"{r['acc_finetuned']:.3f}"[:4] in card  # accuracy reaches the model card
