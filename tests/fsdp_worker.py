"""One rank of ``test_fsdp.py`` / ``test_multinode.py`` (started by ``torch.distributed.run`` or ``accelerate launch``).

A plain training loop on FSDP2-sharded parameters (``fully_shard`` on a CPU device mesh, gloo) drives a
pruning callback through its public protocol (``before_sharding``, ``setup``, ``step_begin``,
``pre_optimizer_step``, ``optimizer_step``, ``finish``). Every rank trains on its own half of each batch
of real digits. The same run without sharding — DDP replicas on the same halves of the batches — is the
reference (replicas rather than one process on whole batches, so that BatchNorm in UPDP's annealed blocks
sees the same per-rank batch statistics in both). Rank ``k`` writes ``rank<k>.json`` into ``argv[1]`` with, per case,
a digest of the final model and its largest difference from the reference; rank 0 also saves the pruned
model once and reloads it with ``AutoPrunedModel``. ``argv[2]`` lists the cases (comma-separated).

Cases: ``depgraph`` (l2 scores per shard, sparse learning on sharded gradients), ``updp`` (annealing
coefficient mirrored onto the sharded model, merge from the gathered weights), ``magnitude`` and ``ovit``
(weights selected on the gathered copy, masks applied per shard; oViT's calibration split by layers across
ranks), ``resume`` (DepGraph with Taylor scores, stopped at a step and resumed from a
``torch.distributed.checkpoint`` of weights and optimizer plus the callback's state: identical to the
uninterrupted run), ``calibration`` (one-shot oViT and RD with ``distributed=True``: each rank measures
half of the layers; the result must equal one process measuring all of them).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMAGE, STEPS, GLOBAL_BATCH = 32, 6, 8
SCHEDULE = {"start": 0, "end": 0.5, "frequency": 1}
CASES = {
    "depgraph": ("depgraph", {"target_macs": 0.6, "group_sparsity": 1e-3, **SCHEDULE}),
    "updp": ("updp", {"num_blocks": 1, "anneal_start": 0.0, "anneal_end": 0.5}),
    "magnitude": ("magnitude", {"sparsity": 0.5, **SCHEDULE}),
    "ovit": ("ovit", {"sparsity": 0.5, "block_size": 16, "num_grads": 4, **SCHEDULE}),
    "resume": ("depgraph", {"target_macs": 0.6, "importance": "taylor", **SCHEDULE}),
}
STOP_AT = 2  # the resume case checkpoints after this many optimizer steps


def build(seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    return T.ViTForImageClassification(T.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb) or any(sa[k].shape != sb[k].shape for k in sa):
        return float("inf")
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel())


class Run:
    """One training run of ``method`` with ``settings``: sharded over ``mesh``, or DDP replicas if it is None."""

    def __init__(self, method, settings, data, mesh, calib):
        from hf_prune.registry import get_method

        self.data, self.mesh = data, mesh
        self.model = build()
        cls = get_method(method).callback_cls
        self.cb = cls(calib=calib, **settings) if get_method(method).kind == "weights" else cls(**settings)
        if mesh is not None:
            self.shard()
            self.forward = self.model
        else:
            self.cb.wrap(self.model)
            self.forward = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)  # Adam would turn round-off
        # in near-zero gradients into whole steps of size lr; SGD keeps sharded and reference runs within round-off
        self.cb.setup(self.model, total_steps=STEPS, example_inputs={"pixel_values": data.pixel_values[:2]})

    def shard(self):
        from torch.distributed.fsdp import fully_shard

        self.cb.before_sharding(self.model)
        for layer in self.model.vit.layers:
            fully_shard(layer, mesh=self.mesh)
        fully_shard(self.model, mesh=self.mesh)

    def batch(self, step):
        lo = step * GLOBAL_BATCH
        x, y = self.data.pixel_values[lo:lo + GLOBAL_BATCH], self.data.labels[lo:lo + GLOBAL_BATCH]
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        part = GLOBAL_BATCH // world
        return x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]

    def train(self, steps):
        for step in steps:
            self.cb.step_begin(step)
            self.model.train()
            x, y = self.batch(step)
            loss = torch.nn.functional.cross_entropy(self.forward(pixel_values=x).logits, y)
            loss.backward()
            self.cb.pre_optimizer_step()
            self.opt.step()
            self.opt.zero_grad()
            self.cb.optimizer_step()
        return self

    def state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory):
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state(), checkpoint_id=str(directory))
        self.cb.save_state(directory)
        torch.distributed.barrier()

    def load(self, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state()
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.cb.load_state(directory)


def reload_diff(path, model, x) -> float:
    from hf_prune import AutoPrunedModel

    loaded = AutoPrunedModel.from_pretrained(path).eval()
    model.eval()
    with torch.no_grad():
        return float((loaded(pixel_values=x).logits - model(pixel_values=x).logits).abs().max())


def calibration_case(calib) -> dict:
    import hf_prune

    out = {}
    for method, settings in (("ovit", {"sparsity": 0.5, "block_size": 16, "num_grads": 4}),
                             ("rd", {"sparsity": 0.5, "grid": 5})):
        runs = {}
        for distributed in (True, False):
            info = {}
            model = hf_prune.prune(build(), method, calib=calib, distributed=distributed,
                                   **({"info": info} if method == "ovit" else {}), **settings)
            runs[distributed] = (model, info)
        (split, info), (whole, whole_info) = runs[True], runs[False]
        out[method] = {"vs_whole": max_diff(split, whole), "digest": digest(split),
                       "zeros": sum(int((p == 0).sum()) for p in split.parameters()),
                       "fisher_bytes": info.get("fisher_bytes"), "whole_fisher_bytes": whole_info.get("fisher_bytes")}
    return out


def run_case(name, data, calib, mesh, out_dir) -> dict:
    if name == "calibration":
        return calibration_case(calib)
    method, settings = CASES[name]
    rank = torch.distributed.get_rank()
    if name == "resume":
        full = Run(method, settings, data, mesh, calib).train(range(STEPS))
        final = full.cb.finish()
        part = Run(method, settings, data, mesh, calib).train(range(STOP_AT))
        ckpt = out_dir / name / "checkpoint"
        part.save(ckpt)
        del part
        resumed = Run(method, settings, data, mesh, calib)
        resumed.load(ckpt)
        resumed_final = resumed.train(range(STOP_AT, STEPS)).cb.finish()
        return {"digest": digest(resumed_final), "vs_uninterrupted": max_diff(resumed_final, final),
                "events": resumed.cb.events, "uninterrupted_events": full.cb.events,
                "macs_ratio": resumed.cb.record["stats"].get("macs_after", 0) / max(
                    resumed.cb.record["stats"].get("macs_before", 1), 1)}
    sharded = Run(method, settings, data, mesh, calib).train(range(STEPS))
    pruned = sharded.cb.finish()
    path = sharded.cb.save_pruned(out_dir / name / "sharded")
    reference = Run(method, settings, data, None, calib).train(range(STEPS)).cb.finish()
    result = {"digest": digest(pruned), "vs_reference": max_diff(pruned, reference),
              "record": sharded.cb.record, "reference_record": None,
              "num_params": sum(p.numel() for p in pruned.parameters()),
              "dense_params": sum(p.numel() for p in build().parameters()),
              "trained_record": (sharded.cb.trained_model.__dict__.get("hf_prune_record") or {}).get("method"),
              "zeros": sum(int((p == 0).sum()) for p in pruned.parameters())}
    if rank == 0:
        result["saved"] = path is not None
        result["reload_diff"] = reload_diff(path, pruned, data.pixel_values[:4])
    return result


def main(out_dir: str, cases: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from hf_prune.data import load_digits

    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    train, _ = load_digits(source="sklearn", image_size=IMAGE, channels=3)
    calib = [{"pixel_values": train.pixel_values[i:i + 4], "labels": train.labels[i:i + 4]} for i in (0, 4)]
    out = Path(out_dir)
    result = {"rank": torch.distributed.get_rank(), "world_size": world, "pid": os.getpid(),
              "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))), "cases": {}}
    for name in cases.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result["cases"][name] = run_case(name, train, calib, mesh, out)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ",".join([*CASES, "calibration"]))
