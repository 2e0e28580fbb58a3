"""FSDP2 smoke run for the GPU benchmark: pruning callbacks on one GPU with sharded (``DTensor``) parameters.

``run(budget_s) -> dict`` (for ``benchmarks/gpu.py``; also ``python benchmarks/fsdp_smoke.py``):

1. ``plain_loop`` — a transformers ViT-S/16 at 224 px, ``fully_shard`` per encoder layer and at the root on
   a one-GPU device mesh (NCCL, world size 1), trained for a few steps on random images with
   :class:`hf_prune.DepGraphCallback` (``target_macs=0.6``) through the plain-loop protocol
   (``before_sharding`` → ``fully_shard`` → ``setup`` → steps → ``finish``); the pruned model is saved by
   ``save_pruned`` and reloaded with ``AutoPrunedModel``: MACs ratio, seconds, peak GPU memory, reload
   difference.
2. ``trainer`` — the same with ``transformers.Trainer`` and ``TrainingArguments(fsdp="full_shard",
   fsdp_config={"version": 2, ...})`` (accelerate's FSDP2), one process: checks that the parameters were
   ``DTensor`` s during training, that ``<output_dir>/pruned`` was written and reloads exactly.

Each part runs only if the time left (``budget_s``) allows; an exception is recorded, not raised.
``run(budget_s, device="cpu")`` is the dry run (gloo, CPU mesh, a tiny ViT; the Trainer part is skipped:
the Trainer falls back to DDP without GPUs).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch


ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _init_process_group(backend: str) -> dict | None:
    """A one-process group (and the environment accelerate reads); returns the environment to restore,
    or None if a group existed already."""
    if torch.distributed.is_initialized():
        return None
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(backend, rank=0, world_size=1)
    return saved


def _close_process_group(saved: dict | None) -> None:
    if saved is None:
        return
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _vit(small: bool):
    import transformers as T

    torch.manual_seed(0)
    if small:
        cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, num_labels=10)
    else:  # ViT-S/16
        cfg = T.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                          intermediate_size=1536, num_labels=10)
    return T.ViTForImageClassification(cfg), cfg.image_size


def _reload_diff(path, model, x) -> float:
    from hf_prune import AutoPrunedModel

    loaded = AutoPrunedModel.from_pretrained(path).to(x.device).eval()
    model.eval()
    with torch.no_grad():
        return float((loaded(pixel_values=x).logits - model(pixel_values=x).logits).abs().max())


def plain_loop(device: str, steps: int = 8, batch: int = 16) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import hf_prune

    model, image = _vit(small=device == "cpu")
    model.to(device)
    mesh = init_device_mesh(device, (1,))
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cb = hf_prune.DepGraphCallback(target_macs=0.6, start=0, end=0.5, frequency=1)
    cb.before_sharding(model)
    for layer in model.vit.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    cb.setup(model, total_steps=steps, example_inputs={"pixel_values": x[:2]})
    for step in range(steps):
        cb.step_begin(step)
        model.train()
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        cb.pre_optimizer_step()
        opt.step()
        opt.zero_grad()
        cb.optimizer_step()
    pruned = cb.finish()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = cb.save_pruned(os.path.join(tmp, "pruned"))
        diff = _reload_diff(path, pruned, x[:4].cpu())
    stats = cb.record["stats"]
    return {"sharded_dtensor_params": sharded, "steps": steps, "seconds": round(seconds, 2),
            "macs_ratio": stats["macs_after"] / stats["macs_before"], "reload_max_abs_diff": diff}


def trainer(device: str, steps: int = 8, batch: int = 16) -> dict:
    import transformers as T
    from torch.distributed.tensor import DTensor

    import hf_prune

    model, image = _vit(small=False)
    data = [{"pixel_values": torch.randn(3, image, image), "labels": int(i % 10)} for i in range(batch * 2)]
    seen = {}

    class Probe(T.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())

    cb = hf_prune.DepGraphCallback(target_macs=0.6, start=0, end=0.5, frequency=1)
    with tempfile.TemporaryDirectory() as tmp:
        args = T.TrainingArguments(tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                                   report_to=[], save_strategy="no", logging_steps=1, fsdp="full_shard",
                                   fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"],
                                                "reshard_after_forward": True})
        t0 = time.perf_counter()
        T.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Probe()]).train()
        seconds = time.perf_counter() - t0
        path = os.path.join(tmp, "pruned")
        written = os.path.isfile(os.path.join(path, "config.json"))
        diff = _reload_diff(path, cb.model, torch.randn(4, 3, image, image)) if written else None
    stats = cb.record["stats"]
    return {"sharded_dtensor_params": seen.get("dtensor"), "seconds": round(seconds, 2), "written": written,
            "macs_ratio": stats["macs_after"] / stats["macs_before"], "reload_max_abs_diff": diff}


def run(budget_s: float = 300.0, device: str | None = None) -> dict:
    """Both parts within ``budget_s`` seconds (a part starts only with time left); returns the results.
    A process group it had to create is destroyed again (and the environment put back) before it returns."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "budget_s": budget_s}
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    saved = _init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        _run_parts(out, device, budget_s, start)
    finally:
        _close_process_group(saved)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _run_parts(out: dict, device: str, budget_s: float, start: float) -> None:
    parts = [("plain_loop", plain_loop)] + ([("trainer", trainer)] if device == "cuda" else [])
    for name, fn in parts:
        left = budget_s - (time.perf_counter() - start)
        if left < 0.3 * budget_s:
            out[name] = {"skipped": f"{left:.0f}s of the budget left"}
            continue
        try:
            out[name] = fn(device)
        except Exception as exc:  # noqa: BLE001 - a smoke run reports what broke
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        if device == "cuda":
            out[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
            torch.cuda.reset_peak_memory_stats()
    if device != "cuda":
        out["trainer"] = {"skipped": "the Trainer's FSDP needs GPUs (without them it falls back to DDP)"}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 300.0), indent=1, default=str))
