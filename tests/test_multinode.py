"""A two-machine launch, simulated on one host: two ``accelerate launch --num_machines 2`` commands with
``--machine_rank 0`` and ``--machine_rank 1``, both pointing at ``127.0.0.1``, one process each.

They run ``tests/fsdp_worker.py``'s ``depgraph`` case: a DepGraph callback on FSDP2-sharded parameters
(gloo) across the two "machines", against DDP replicas across the same two. This is the README's multi-node
recipe with the machines' addresses replaced by the loopback one; accelerate starts ``torchrun`` with
``--nnodes 2 --node_rank k`` underneath (``--multi_gpu`` is what makes it start a distributed launch on
a machine without GPUs; the worker shards with ``fully_shard`` on a CPU device mesh itself, since
accelerate's FSDP plugin needs GPUs).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from test_fsdp import ROOT, TOL, WORKER, free_port, read_ranks, worker_env


def launch(machine_rank: int, port: int, out_dir) -> list[str]:
    if importlib.util.find_spec("accelerate") is None:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(machine_rank),
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER),
                str(out_dir), "depgraph"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(machine_rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(WORKER), str(out_dir), "depgraph"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multinode")
    port = free_port()
    procs = [subprocess.Popen(launch(k, port, out_dir), cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"machine launch failed:\n{out[-3000:]}\n{err[-8000:]}"
    return read_ranks(out_dir)


def test_two_machines_one_process_each(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]


def test_sharded_across_machines_equals_replicas_and_reloads(ranks):
    a, b = (r["cases"]["depgraph"] for r in ranks)
    assert a["digest"] == b["digest"] and a["vs_reference"] <= TOL
    assert a["num_params"] < 0.75 * a["dense_params"]
    assert a["saved"] is True and a["reload_diff"] == 0.0
