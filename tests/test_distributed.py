"""Two real processes on CPU (gloo): masks and weights stay identical on every rank.

Runs ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no tests/distributed_worker.py`` (``--cpu --num_processes 2`` would start only one
process). On a machine without GPUs ``--multi_gpu`` still starts two processes; the worker asks for
``PartialState(cpu=True)`` / ``TrainingArguments(use_cpu=True)``, which makes accelerate use the gloo
backend (MULTI_CPU). Falls back to ``torchrun --nproc_per_node 2`` if accelerate's launcher is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(out_dir: Path) -> list[str]:
    port = str(_free_port())
    if importlib.util.find_spec("accelerate") is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port, str(WORKER), str(out_dir)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            str(WORKER), str(out_dir)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(_launch_command(out_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    files = sorted(out_dir.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def test_two_real_processes(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["backend"] == "gloo" and "MULTI_CPU" in r["distributed_type"] for r in ranks)


def test_trainer_ddp_masks_and_weights_identical(ranks):
    a, b = (r["trainer"] for r in ranks)
    assert a["first_labels"] != b["first_labels"]  # each rank trains on its own shard of the data
    assert a["events"] and len(a["events"]) >= 2 and a["removed"]
    assert a["events"] == b["events"]
    assert a["removed"] == b["removed"]
    assert a["weights"] == b["weights"] and a["num_params"] == b["num_params"]


def test_reduction_is_what_makes_masks_agree(ranks):
    a, b = (r["reduction"] for r in ranks)
    # from local scores alone (different data per rank) the ranks would prune different units ...
    assert a["all_reduce"]["local_plan"] != b["all_reduce"]["local_plan"]
    # ... with the reduction they prune the same ones
    assert a["all_reduce"]["removed"] == b["all_reduce"]["removed"] and a["all_reduce"]["removed"]
    assert a["broadcast"]["removed"] == b["broadcast"]["removed"]
    # broadcast: rank 0 decides
    assert a["broadcast"]["removed_roots"] == a["broadcast"]["local_plan"]
