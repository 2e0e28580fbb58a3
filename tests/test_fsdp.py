"""Pruning callbacks on FSDP2-sharded parameters: two real processes on CPU (gloo), one launch.

``torchrun --nproc_per_node 2 tests/fsdp_worker.py`` runs every case of the worker (see its docstring):
a plain training loop on ``fully_shard``-ed parameters driven through the callbacks' public protocol,
against the same loop on DDP replicas. What must hold: both ranks end with the same model; it equals the
unsharded run (float tolerance); the checkpoint written once by rank 0 reloads exactly; a run resumed
from a ``torch.distributed.checkpoint`` checkpoint equals the uninterrupted one; one-shot oViT / RD with
the calibration split across ranks equal one process doing all of it, with half the Fisher per rank.

Not here: the Trainer with ``fsdp=...`` (on a machine without GPUs it falls back to DDP, so only
``benchmarks/fsdp_smoke.py`` on a GPU exercises it) and ``accelerate launch --use_fsdp`` (same reason;
``tests/test_multinode.py`` launches through accelerate).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def read_ranks(out_dir: Path, n: int = 2) -> list[dict]:
    files = sorted(out_dir.glob("rank*.json"))
    assert len(files) == n, f"expected {n} rank files, got {[f.name for f in files]}"
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return read_ranks(out_dir)


def test_two_processes(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]


@pytest.mark.parametrize("case", ["depgraph", "updp", "magnitude", "ovit"])
def test_sharded_run_equals_unsharded_and_ranks_agree(ranks, case):
    a, b = (r["cases"][case] for r in ranks)
    assert a["digest"] == b["digest"]  # both ranks end with the same model
    assert a["vs_reference"] <= TOL, f"{case}: sharded vs replicated final weights differ by {a['vs_reference']}"
    assert a["record"]["method"] == case and a["trained_record"] == case


def test_structured_methods_really_pruned(ranks):
    c = ranks[0]["cases"]
    dep = c["depgraph"]
    assert dep["num_params"] < 0.75 * dep["dense_params"]  # compacted (target_macs=0.6)
    assert dep["record"]["stats"]["macs_after"] <= 0.6 * dep["record"]["stats"]["macs_before"] * 1.05
    assert c["updp"]["record"]["stats"]["merged_blocks"] == 1 and c["updp"]["num_params"] < c["updp"]["dense_params"]
    for case in ("magnitude", "ovit"):  # half of the prunable weights are zero, shapes unchanged
        assert c[case]["num_params"] == c[case]["dense_params"] and c[case]["zeros"] >= 8192


@pytest.mark.parametrize("case", ["depgraph", "updp", "magnitude", "ovit"])
def test_written_once_by_rank_zero_and_reloads_exactly(ranks, case):
    a, b = (r["cases"][case] for r in ranks)
    assert a["saved"] is True and "saved" not in b  # rank 1 neither wrote nor reloaded
    assert a["reload_diff"] == 0.0


def test_resume_from_sharded_checkpoint_is_exact(ranks):
    a, b = (r["cases"]["resume"] for r in ranks)
    assert a["digest"] == b["digest"]
    assert a["vs_uninterrupted"] == 0.0
    assert a["events"] == a["uninterrupted_events"] and any(e["step"] < 2 for e in a["events"])
    assert any(e["step"] >= 2 and e["changed"] for e in a["events"])  # pruning went on after the resume
    assert a["macs_ratio"] < 0.7


@pytest.mark.parametrize("method", ["ovit", "rd"])
def test_calibration_split_across_ranks_equals_one_process(ranks, method):
    a, b = (r["cases"]["calibration"][method] for r in ranks)
    assert a["digest"] == b["digest"] and a["vs_whole"] == 0.0 and a["zeros"] > 0
    if method == "ovit":  # each rank held half of the Fisher information (the layers split evenly here)
        assert a["fisher_bytes"] + b["fisher_bytes"] == a["whole_fisher_bytes"]
        assert math.isclose(a["fisher_bytes"], a["whole_fisher_bytes"] / 2, rel_tol=0.25)


# ------------------------------------------------------------------ in-process checks of the shard helpers
def test_shard_helpers_are_the_plain_operations_on_plain_tensors():
    from hf_prune.core.distributed import ShardedSum, fill_indices_, index_range, local_part, multiply_, shard_region

    t = torch.arange(12.0).reshape(3, 4)
    assert local_part(t) is not t and torch.equal(local_part(t), t)
    assert shard_region(t) == (slice(0, 3), slice(0, 4)) and index_range(t, 1) == (0, 4)
    fill_indices_(t, 1, torch.tensor([0, 3]))
    assert torch.equal(t[:, 0], torch.zeros(3)) and torch.equal(t[:, 3], torch.zeros(3))
    multiply_(t, torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 3))
    assert float(t[:, 1].abs().sum()) == 0.0 and float(t[1, 2]) == 6.0
    s = ShardedSum(5)
    s.add(torch.tensor([1, 3]), torch.tensor([2.0, 4.0]), t)
    assert s.total().tolist() == [0.0, 2.0, 0.0, 4.0, 0.0]


def test_sharded_model_without_a_full_copy_is_a_clear_error(monkeypatch):
    import hf_prune.trainer.callback as base
    from hf_prune.errors import PruningError
    from hf_prune.methods.depgraph.callback import DepGraphCallback

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    monkeypatch.setattr(base, "has_sharded_parameters", lambda m: True)  # as if fully_shard had run
    with pytest.raises(PruningError, match=r"before_sharding\(model\) before fully_shard"):
        DepGraphCallback(target_macs=0.5).setup(model, total_steps=4, example_inputs=torch.randn(2, 4))


def test_stagewise_refuses_sharding():
    from hf_prune.errors import PruningError
    from hf_prune.methods.stagewise.callback import StageWiseCallback

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(PruningError, match="functional_call"):
        StageWiseCallback(target_macs=0.7).before_sharding(model)


def test_deepspeed_zero3_partitions_are_refused():
    from hf_prune.errors import PruningError
    from hf_prune.methods.magnitude.callback import MagnitudeCallback

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].weight.ds_status = "NOT_AVAILABLE"  # what ZeRO-3 leaves on every parameter it partitions
    for call in (lambda cb: cb.setup(model, total_steps=4), lambda cb: cb.before_sharding(model)):
        with pytest.raises(PruningError, match="ZeRO-3"):
            call(MagnitudeCallback(sparsity=0.5))
