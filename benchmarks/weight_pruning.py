"""Unstructured weight pruning: one-shot accuracy on real digits, RD and oViT cost on big models.

Parts (``--parts``, default all; each part's numbers are cached in ``--cache`` so parts can be run
one at a time and the results file is re-composed from whatever is cached):

* ``digits``: a small CNN and a tiny ViT trained on 4,000 real MNIST digits
  (``hf_prune.data.load_digits(source="mnist")``), then pruned one-shot (no fine-tuning) to
  50/70/90% of the prunable weights (all Conv/Linear except stem/patch embedding and classifier)
  with every allocation (uniform, global, LAMP, ERK, RD) under magnitude selection, and with oViT
  (OBS selection, global threshold on OBS losses; also with a uniform allocation). Accuracy on the
  1,000 held-out digits and top-1 agreement with the dense model.
* ``rd``: RD allocation on timm ``resnet50`` and ``deit_small_patch16_224`` (random weights, Gaussian
  noise calibration images = the paper's zero-data variant): curve time, DP time and table size,
  peak RSS; the DP again on a 101-point grid (curves linearly interpolated) and a measured forward at
  the brief's 32×224 to extrapolate the curve cost at full settings.
* ``ovit``: oViT on DeiT-S (112×112) at one configuration per run (``--large-num-grads``,
  ``--large-block-size``, ``--ovit-dtype``, ``--fisher``, ``--max-fisher-mb``): time per phase and
  peak RSS, with the extrapolation to the paper's B = 192, m = 4096.
* ``gradual``: the small CNN on real digits, dense-trained, then pruned to 90% with the same
  fine-tuning budget four ways: oViT one-shot + fine-tune, oViT gradual (cubic, ``OViTCallback``),
  and the same two with global magnitude. Held-out accuracy.
* ``semi24``: dense vs 2:4 (``torch.sparse.to_sparse_semi_structured``) DeiT-S linear layers at
  batch 256 fp16/bf16 on a CUDA GPU; without one it records "not measured".

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/weight_pruning.py --parts PART``
(the default runs every part in one process; run large parts one per process for clean RSS).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, env_info, header_md, md_table  # noqa: E402
from hf_prune.methods.rd import curves as rd_mod  # noqa: E402
from hf_prune.api import oneshot  # noqa: E402
from hf_prune.sparse.masks import prunable_layers, safetensors_size  # noqa: E402

PARTS = ("digits", "rd", "ovit", "gradual", "semi24")


# ----------------------------------------------------------------------------------------- helpers


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 5 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.stem = block(1, 16)
        self.features = nn.Sequential(block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 64),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.ReLU())
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(self.stem(x)))


VIT_PATCH = 7


def tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=VIT_PATCH, in_chans=1,
                             embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)


def train(model, train_split, *, epochs, lr, batch_size=64, seed=0):
    from hf_prune.data import make_loader

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loader = make_loader(train_split, batch_size=batch_size, shuffle=True, seed=seed)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        for b in loader:
            loss = nn.functional.cross_entropy(model(b["pixel_values"]), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, split, dense_pred=None):
    model.eval()
    pred = torch.cat([model(split.pixel_values[i:i + 500]).argmax(-1) for i in range(0, len(split), 500)])
    acc = float((pred == split.labels).float().mean())
    agree = float((pred == dense_pred).float().mean()) if dense_pred is not None else 1.0
    return acc, agree, pred


def recalibrate_bn(model, images, batch_size=128):
    """Re-estimate BatchNorm running statistics on ``images`` (cumulative average); False without BN."""
    from hf_prune.core.execution import recalibrate_batchnorm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    recalibrate_batchnorm(model, bns, batches, model)
    model.eval()
    return bool(bns)


# ----------------------------------------------------------------------------------------- digits


def mnist_splits():
    """The benchmark's MNIST train/held-out splits and one fixed order of the training images."""
    from hf_prune.data import load_digits

    train_split, val = load_digits(source="mnist", image_size=28, channels=1, seed=0)
    return train_split, val, torch.randperm(len(train_split), generator=torch.Generator().manual_seed(1))


def part_digits(args) -> dict:
    train_split, val, perm = mnist_splits()
    # RD calibration: 256 training images (the paper's ImageNet setting), 4 batches of 64
    rd_idx = perm[:256]
    rd_calib = [{"pixel_values": train_split.pixel_values[rd_idx[i:i + 64]], "labels": train_split.labels[rd_idx[i:i + 64]]}
                for i in range(0, 256, 64)]
    # oViT gradients: m mini-batches of 16 training images
    recal_images = train_split.pixel_values[perm[256:768]]  # 512 other training images
    m, bs = args.num_grads, 16
    ov_idx = torch.cat([perm, perm])[: m * bs]
    ov_calib = [{"pixel_values": train_split.pixel_values[ov_idx[i:i + bs]], "labels": train_split.labels[ov_idx[i:i + bs]]}
                for i in range(0, m * bs, bs)]
    out = {"models": {}, "settings": {"rd_grid": args.grid, "rd_calib_images": 256, "ovit_num_grads": m,
                                      "ovit_batch": bs, "ovit_block_size": args.block_size,
                                      "ovit_damping": args.damping, "epochs": args.epochs,
                                      "train_items": len(train_split), "val_items": len(val)}}
    builders = {"cnn": (SmallCNN, 3e-3), "vit": (tiny_vit, 2e-3)}
    global VIT_PATCH
    VIT_PATCH = args.vit_patch
    for name in args.models:
        build, lr = builders[name]
        epochs = args.vit_epochs if name == "vit" and args.vit_epochs else args.epochs
        torch.manual_seed(0)
        t0 = time.perf_counter()
        dense = train(build(), train_split, epochs=epochs, lr=lr)
        train_s = time.perf_counter() - t0
        dense_acc, _, dense_pred = evaluate(dense, val)
        layers = list(prunable_layers(dense))
        n_prunable = sum(dict(dense.named_modules())[n].weight.numel() for n in layers)
        print(f"[digits] {name}: trained in {train_s:.0f}s, dense acc {dense_acc:.4f}, {len(layers)} prunable layers "
              f"({n_prunable} weights)", flush=True)
        rec = {"dense_acc": dense_acc, "train_seconds": train_s, "epochs": epochs, "prunable_layers": len(layers),
               "vit_patch": VIT_PATCH if name == "vit" else None,
               "prunable_weights": n_prunable, "rows": [], "layer_sparsity": {}}
        curves = {}
        for red in ("max", "mean"):
            t0 = time.perf_counter()
            curves[red] = rd_mod.distortion_curves(dense, rd_calib, layers=layers, grid=args.grid, reduction=red)
            rec[f"rd_curve_seconds_{red}"] = time.perf_counter() - t0
        # the same curves without grid points above 95% per layer (= max_sparsity=0.95): no layer removed whole
        curves["max-cap95"] = copy.deepcopy(curves["max"])
        for i, n_l in enumerate(curves["max-cap95"].sizes):
            keep_pts = [j for j, k in enumerate(curves["max-cap95"].pruned[i]) if k <= 0.95 * n_l + 1e-9]
            curves["max-cap95"].pruned[i] = [curves["max-cap95"].pruned[i][j] for j in keep_pts]
            curves["max-cap95"].distortion[i] = [curves["max-cap95"].distortion[i][j] for j in keep_pts]
        variants = [("magnitude", "uniform"), ("magnitude", "global"), ("magnitude", "lamp"), ("magnitude", "erk"),
                    ("rd", "max"), ("rd", "mean"), ("rd", "max-cap95"), ("ovit", None), ("ovit", "uniform")]
        for sparsity in args.sparsities:
            for method, alloc in variants:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                if method == "magnitude":
                    stats = oneshot(model, "magnitude", sparsity=sparsity, allocation=alloc)[1]
                    label = f"magnitude + {alloc}"
                elif method == "rd":
                    stats = oneshot(model, "rd", sparsity=sparsity, calib=rd_calib, curves=curves[alloc])[1]
                    label = ("RD (max, layers ≤ 95%) + magnitude" if alloc == "max-cap95"
                             else f"RD ({alloc} over samples) + magnitude")
                else:
                    stats = oneshot(model, "ovit", sparsity=sparsity, calib=ov_calib, allocation=alloc,
                                    block_size=args.block_size, num_grads=m, damping=args.damping, num_threads=1)[1]
                    label = "oViT (global OBS threshold)" if alloc is None else f"oViT OBS + {alloc}"
                sec = time.perf_counter() - t0
                acc, agree, _ = evaluate(model, val, dense_pred)
                row = {"sparsity": sparsity, "method": label, "acc": acc, "agree": agree, "seconds": sec,
                       "achieved": stats["global_sparsity"]}
                if recalibrate_bn(model, recal_images):
                    row["acc_bn"], row["agree_bn"], _ = evaluate(model, val, dense_pred)
                rec["rows"].append(row)
                rec["layer_sparsity"][f"{label}@{sparsity}"] = stats["layers"]
                print(f"[digits] {name} {sparsity:.2f} {label:34s} acc {acc:.4f} agree {agree:.4f} "
                      f"bn-recal acc {row.get('acc_bn', float('nan')):.4f} ({sec:.1f}s)", flush=True)
                if method == "magnitude" and alloc == "global" and sparsity == max(args.sparsities):
                    rec["size_dense"] = safetensors_size(dense)
                    rec["size_sparse"] = safetensors_size(model)
        out["models"][name] = rec
    return out


# ----------------------------------------------------------------------------------------- RD large


def _interp_curves(curves, points: int):
    """Curves resampled on ``points`` evenly spaced sparsities (linear interpolation)."""
    new = copy.deepcopy(curves)
    for i, (n, ks, ds) in enumerate(zip(curves.sizes, curves.pruned, curves.distortion)):
        kk = [round(j * n / (points - 1)) for j in range(points)]
        k_t, d_t = torch.tensor(ks, dtype=torch.float64), torch.tensor(ds, dtype=torch.float64)
        vals = []
        for k in kk:
            j = int(torch.searchsorted(k_t, torch.tensor(float(k), dtype=torch.float64)).clamp(1, len(ks) - 1))
            k0, k1, d0, d1 = k_t[j - 1], k_t[j], d_t[j - 1], d_t[j]
            vals.append(float(d0 + (d1 - d0) * (k - k0) / max(float(k1 - k0), 1.0)))
        new.pruned[i], new.distortion[i] = kk, vals
    return new


def part_rd(args) -> dict:
    import timm

    out = {"settings": {"calib_images": args.rd_images, "resolution": args.rd_res, "grid": args.rd_grid,
                        "threads": torch.get_num_threads(), "sparsity": 0.5}, "models": {}}
    for name in args.rd_models:
        kw = {"img_size": args.rd_res} if name.startswith("deit") else {}
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kw).eval()
        calib = [(torch.randn(args.rd_images, 3, args.rd_res, args.rd_res), None)]
        layers = list(prunable_layers(model))
        n = sum(dict(model.named_modules())[x].weight.numel() for x in layers)
        info = {}
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            alloc = rd_mod.allocate_rd(model, 0.5, calib, layers=layers, grid=args.rd_grid, info=info)
            total = time.perf_counter() - t0
        curves = info["curves"]
        fwd_small = curves.seconds / max(curves.forwards, 1)
        # the DP at the paper's resolution (101 points), on linearly interpolated curves
        fine = _interp_curves(curves, 101)
        info101 = {}
        with PeakRSS() as mem101:
            t0 = time.perf_counter()
            rd_mod.allocate_rd(model, 0.5, layers=layers, curves=fine, info=info101)
            dp101 = time.perf_counter() - t0
        info_exact = {}
        t0 = time.perf_counter()
        try:
            rd_mod.rd_dp(curves.distortion, [[s - k for k in ks] for s, ks in zip(curves.sizes, curves.pruned)],
                         n - round(0.5 * n), unit=1000, info=info_exact)
            dp_1k = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            dp_1k = f"failed: {exc}"
        # one forward at the brief's full setting (32 images at 224) for the extrapolation
        full = timm.create_model(name, pretrained=False).eval() if kw else model
        x = torch.randn(32, 3, 224, 224)
        with PeakRSS() as memfull, torch.no_grad():
            t0 = time.perf_counter()
            full(x)
            fwd_full = time.perf_counter() - t0
        del full, x
        rec = {"layers": len(layers), "prunable_weights": n, "total_seconds": total,
               "curve_seconds": curves.seconds, "forwards": curves.forwards, "forward_seconds": fwd_small,
               "dp_seconds": info["dp_seconds"], "unit": info["unit"], "states": info["states"],
               "table_bytes": info["table_bytes"], "peak_rss_delta_mb": mem.delta_mb, "rss_base_mb": mem.base / 2 ** 20,
               "dp101_seconds": dp101, "dp101_table_bytes": info101["table_bytes"], "dp101_peak_rss_delta_mb": mem101.delta_mb,
               "dp_unit1000_seconds": dp_1k, "dp_unit1000_states": info_exact.get("states"),
               "forward_32x224_seconds": fwd_full, "forward_32x224_peak_rss_delta_mb": memfull.delta_mb,
               "extrapolated_curve_seconds_32x224_grid21": len(layers) * 20 * fwd_full,
               "extrapolated_curve_seconds_32x224_grid101": len(layers) * 100 * fwd_full,
               "sparsity_min": min(alloc.values()), "sparsity_max": max(alloc.values())}
        out["models"][name] = rec
        print(f"[rd] {name}: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()})}",
              flush=True)
        del model
    return out


# ----------------------------------------------------------------------------------------- oViT large


def _ovit_label(args) -> str:
    budget = f", max_fisher_mb={args.max_fisher_mb:g}" if args.max_fisher_mb else ""
    return (f"m={args.large_num_grads} x {args.ovit_batch}, B={args.large_block_size}, {args.ovit_dtype}, "
            f"fisher={args.fisher}{budget}")


def part_ovit(args) -> dict:
    """oViT on DeiT-S (random weights, Gaussian images with random labels): time per phase and peak RSS.
    Each configuration is one run (one process for a clean RSS baseline), cached under its label."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=args.rd_res).eval()
    m = args.large_num_grads
    calib = [(torch.randn(args.ovit_batch, 3, args.rd_res, args.rd_res), torch.randint(0, 1000, (args.ovit_batch,)))
             for _ in range(m)]
    info = {}
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = oneshot(model, "ovit", sparsity=0.5, calib=calib, block_size=args.large_block_size, num_grads=m,
                        damping=1e-8, dtype=args.ovit_dtype, fisher=args.fisher, max_fisher_mb=args.max_fisher_mb,
                        num_threads=1, info=info)[1]
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = {"model": "deit_small_patch16_224", "img_size": args.rd_res, "num_grads": m, "batch": args.ovit_batch,
           "block_size": args.large_block_size, "dtype": args.ovit_dtype, "chunk_bytes": 256 << 20,
           "max_fisher_mb": args.max_fisher_mb, "prunable_weights": stats["num_weights"],
           "achieved_sparsity": stats["global_sparsity"], "total_seconds": total, "cpu_seconds": cpu,
           "peak_rss_delta_mb": mem.delta_mb,
           "rss_base_mb": mem.base / 2 ** 20, "layers": len(stats["layers"]),
           **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}}
    print(f"[ovit] {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()})}", flush=True)
    return {"runs": {_ovit_label(args): rec}}


def _ovit_runs(o: dict) -> dict:
    """Runs of the ``ovit`` part; a cache from before the Fisher-block path held one run."""
    if "runs" in o:
        return o["runs"]
    rec = dict(o, fisher="gradients", groups=1, gradient_rounds=1)
    return {f"m={o['num_grads']} x {o['batch']}, B={o['block_size']}, float64, fisher=gradients": rec}


def _ovit_model_mb(rec: dict) -> float:
    """Predicted peak: one group's Fisher information + 6 B/weight (order, losses) + 4 B/weight
    (updated weights) + three chunks of F⁻¹ (the chunk and its temporaries)."""
    fisher = rec.get("max_group_fisher_bytes", rec.get("grad_bytes", 0))
    return (fisher + 10 * rec["prunable_weights"] + 3 * rec["chunk_bytes"]) / 2 ** 20


def _ovit_extrapolation(rec: dict) -> dict:
    """The paper's setting (B = 192, m = 4096, 224×224) from one measured run, component by component:
    gradient passes ∝ m × (tokens at 224 / tokens here, attention included ≈ ×4.3 for 197 vs 50
    tokens), accumulation ∝ m·B, removal sweep and replay ∝ B², memory from the formulas. Phase times
    are wall-clock; they are scaled by the run's CPU/wall ratio to remove time spent waiting for other
    jobs on the shared machine (one thread, so CPU time ≈ busy time)."""
    d = rec["prunable_weights"]
    m0, b0 = rec["num_grads"], rec["block_size"]
    item = 4 if rec["dtype"] == "float32" else 8
    tok_ratio = 4.3 if rec["img_size"] == 112 else 1.0
    busy = min(1.0, rec["cpu_seconds"] / rec["total_seconds"]) if rec.get("cpu_seconds") else 1.0
    pass_s = max(rec["grad_seconds"] - rec.get("accumulate_seconds", 0.0), 0.0) / max(rec["gradient_rounds"], 1) / m0
    pass_s, acc_s, obs_s = (pass_s * busy, rec.get("accumulate_seconds", 0.0) * busy,
                            (rec["sweep_seconds"] + rec["apply_seconds"]) * busy)
    return {
        "blocks_gb": d * 192 * item / 2 ** 30, "buffer_gb": 48 * d * 4 / 2 ** 30, "gradients_gb": 4096 * d * 4 / 2 ** 30,
        "grad_pass_hours": pass_s * 4096 * tok_ratio / 3600,
        "accumulate_hours": acc_s * (4096 / m0) * (192 / b0) / 3600,
        "obs_hours": obs_s * (192 / b0) ** 2 / 3600,
    }


# ----------------------------------------------------------------------------------------- gradual


def finetune(model, split, steps: int, *, lr: float, callback=None, batch_size: int = 64, seed: int = 1):
    """``steps`` AdamW steps (cosine decay to 0); masks re-applied after every step. With a weight
    pruning ``callback`` (plain-loop API: setup / step_begin / pre_optimizer_step / optimizer_step),
    the callback prunes on its schedule; otherwise the model's attached masks are enforced."""
    from hf_prune.data import make_loader
    from hf_prune.sparse.masks import get_weight_masks

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if callback is not None:
        callback.setup(model, total_steps=steps)
    masks = get_weight_masks(model)
    model.train()
    step = 0
    while step < steps:
        for b in make_loader(split, batch_size=batch_size, shuffle=True, seed=seed + step):
            if callback is not None:
                callback.step_begin(step)
            loss = nn.functional.cross_entropy(model(b["pixel_values"]), b["labels"])
            opt.zero_grad()
            loss.backward()
            if callback is not None:
                callback.pre_optimizer_step()
            opt.step()
            sched.step()
            if callback is not None:
                callback.optimizer_step()
            elif masks is not None:
                masks.enforce()
            step += 1
            if step == steps:
                break
    if callback is not None:
        callback.finish()
    model.eval()
    return model


def part_gradual(args) -> dict:
    """One-shot vs gradual (cubic) pruning to ``--gradual-sparsity`` with the same fine-tuning budget."""
    from hf_prune import MagnitudeCallback, OViTCallback
    from hf_prune.sparse.masks import get_weight_masks

    train_split, val, perm = mnist_splits()
    m, bs = args.gradual_num_grads, 16
    ov_calib = [{"pixel_values": train_split.pixel_values[perm[i:i + bs]], "labels": train_split.labels[perm[i:i + bs]]}
                for i in range(0, m * bs, bs)]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = train(SmallCNN(), train_split, epochs=args.gradual_epochs, lr=3e-3)
    train_s = time.perf_counter() - t0
    dense_acc, _, _ = evaluate(dense, val)
    print(f"[gradual] dense acc {dense_acc:.4f} ({train_s:.0f}s)", flush=True)
    N, sp, lr = args.gradual_steps, args.gradual_sparsity, args.gradual_lr
    ovit_opts = dict(block_size=args.block_size, num_grads=m, damping=args.damping, num_threads=1)
    sched = dict(schedule="cubic", initial=args.gradual_initial, start=0, end=args.gradual_end,
                 frequency=args.gradual_frequency)
    variants = {
        "oViT one-shot + fine-tune": ("oneshot", "ovit"),
        "oViT gradual (cubic) + fine-tune": ("gradual", "ovit"),
        "global magnitude one-shot + fine-tune": ("oneshot", "magnitude"),
        "global magnitude gradual (cubic) + fine-tune": ("gradual", "magnitude"),
    }
    rows = []
    for label, (how, method) in variants.items():
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        after_prune = None
        if how == "oneshot":
            if method == "ovit":
                oneshot(model, "ovit", sparsity=sp, calib=ov_calib, **ovit_opts)
            else:
                oneshot(model, "magnitude", sparsity=sp, allocation="global")
            after_prune = evaluate(model, val)[0]
            finetune(model, train_split, N, lr=lr)
            events = 1
        else:
            if method == "ovit":
                cb = OViTCallback(sparsity=sp, calib=ov_calib, **sched,
                                  **{k: v for k, v in ovit_opts.items() if k != "num_threads"})
            else:
                cb = MagnitudeCallback(sparsity=sp, allocation="global", **sched)
            finetune(model, train_split, N, lr=lr, callback=cb)
            events = len(cb.events)
        sec = time.perf_counter() - t0
        acc = evaluate(model, val)[0]
        achieved = get_weight_masks(model).stats()["global_sparsity"]
        rows.append({"method": label, "acc_after_prune": after_prune, "acc": acc, "sparsity": achieved,
                     "pruning_events": events, "seconds": sec})
        print(f"[gradual] {label}: acc {acc:.4f} (right after pruning: {after_prune}), sparsity {achieved:.3f}, "
              f"{events} pruning steps, {sec:.0f}s", flush=True)
    return {"dense_acc": dense_acc, "train_seconds": train_s, "rows": rows,
            "settings": {"epochs": args.gradual_epochs, "steps": N, "sparsity": sp, "lr": lr, "num_grads": m,
                         "batch": bs, "block_size": args.block_size, "damping": args.damping, **sched,
                         "train_items": len(train_split), "val_items": len(val)}}


# ----------------------------------------------------------------------------------------- 2:4 on GPU

DEIT_S_LINEARS = (("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384))


def _cuda_ms(fn, iters: int, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls after ``warmup``."""
    import statistics

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def part_semi24(args) -> dict:
    """Dense vs 2:4 (``torch.sparse.to_sparse_semi_structured``) for DeiT-S's linear layers at batch
    ``--semi-batch`` × 197 tokens, fp16 and bf16. Without a CUDA GPU nothing is measured."""
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no GPU (torch.cuda.is_available() is False on this machine)"}
    major, minor = torch.cuda.get_device_capability()
    device = torch.cuda.get_device_name(0)
    if major < 8:
        return {"measured": False, "reason": f"{device} has compute capability {major}.{minor}; 2:4 kernels need 8.0+"}
    from torch.sparse import to_sparse_semi_structured

    from hf_prune.sparse.masks import select_nm

    tokens, rows, iters = 197, [], 50
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for name, fin, fout in DEIT_S_LINEARS:
            w = torch.randn(fout, fin, device="cuda", dtype=dtype)
            w = w * select_nm(w, 2, 4).to(w.dtype)
            x = torch.randn(args.semi_batch * tokens, fin, device="cuda", dtype=dtype)
            try:
                ws = to_sparse_semi_structured(w)
                sparse_out = nn.functional.linear(x, ws)
            except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                rows.append({"layer": f"{name} ({fin} → {fout})", "dtype": str(dtype).split(".")[-1],
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            dense_out = nn.functional.linear(x, w)
            dense_ms = _cuda_ms(lambda: nn.functional.linear(x, w), iters)
            sparse_ms = _cuda_ms(lambda: nn.functional.linear(x, ws), iters)
            rows.append({"layer": f"{name} ({fin} → {fout})", "dtype": str(dtype).split(".")[-1],
                         "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "max_abs_diff": float((dense_out.float() - sparse_out.float()).abs().max())})
            print(f"[semi24] {rows[-1]}", flush=True)
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"measured": False, "reason": f"to_sparse_semi_structured failed on {device}: {rows[0]['error']}"}
    return {"measured": True, "device": device, "batch": args.semi_batch, "tokens": tokens, "iters": iters,
            "rows": ok, "errors": [r for r in rows if "error" in r]}


# ----------------------------------------------------------------------------------------- report


def _fmt(x, nd=4):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def compose(cache: dict) -> str:
    info = dict(cache.get("env", {}))
    cmds = []
    for key in ("rd", "ovit", "digits", "gradual", "semi24"):
        part = cache.get(key) or {}
        if key == "rd":
            envs = [rec.get("env") for rec in part.get("models", {}).values()]
        elif key == "ovit" and part:
            envs = [rec.get("env") for rec in _ovit_runs(part).values()]
        else:
            envs = [part.get("env")]
        for e in envs:
            if e and e["command"] not in cmds:
                cmds.append(e["command"])
    if cmds:
        info["command"] = "`, `".join(cmds)
    parts = [header_md("Unstructured weight pruning: RD, oViT and allocation baselines", info, notes=[
        "CPU only, one intra-op thread for every part (faster than two on this shared 2-core machine)",
        "each large measurement ran in its own process (clean peak-RSS baselines); every section lists the "
        "command, date and load of its own run; the date above is the last run's",
    ])]
    d = cache.get("digits")
    if d:
        s = d["settings"]
        parts.append("\n## One-shot accuracy on real digits (no fine-tuning)\n\n")
        parts.append(f"- command: `{d['env']['command']}` — {d['env']['date']}, load {d['env']['loadavg_start']}\n"
                     f"- data: `load_digits(source=\"mnist\", image_size=28, channels=1)`: {s['train_items']} train / "
                     f"{s['val_items']} held-out real MNIST digits; accuracy on the held-out split; *agree* = top-1 "
                     f"agreement with the dense model\n"
                     f"- training: AdamW + one-cycle, batch 64 (epochs per model below); pruned layers: all Conv/Linear "
                     f"except the stem / patch embedding and the classifier\n"
                     f"- RD: {s['rd_calib_images']} training images, grid {s['rd_grid']} points on [0, 1], curves measured "
                     f"once per model and reused for every sparsity; distortion = per-sample logit MSE, worst case "
                     f"(max, the paper's runs) or mean over samples\n"
                     f"- oViT: m = {s['ovit_num_grads']} mini-batch gradients of {s['ovit_batch']} training images, "
                     f"block size {s['ovit_block_size']}, damping {s['ovit_damping']}, float64\n")
        for name, rec in d["models"].items():
            title = {"cnn": "Small CNN (4 conv + 2 linear, BatchNorm)",
                     "vit": f"Tiny ViT (timm, 28×28, patch {rec.get('vit_patch') or 4}, dim 96, depth 4, 3 heads)"}[name]
            parts.append(f"\n### {title}: dense accuracy {rec['dense_acc']:.4f}; {rec['prunable_layers']} prunable "
                         f"layers, {rec['prunable_weights']} weights; trained {rec.get('epochs', s['epochs'])} epochs "
                         f"in {rec['train_seconds']:.0f} s\n\n")
            if "env" in rec and rec["env"]["command"] != d["env"]["command"]:
                parts.append(f"(re-run: `{rec['env']['command']}` — {rec['env']['date']})\n\n")
            sps = sorted({r["sparsity"] for r in rec["rows"]})
            methods = list(dict.fromkeys(r["method"] for r in rec["rows"]))
            rows = []
            for meth in methods:
                row = [meth]
                for sp in sps:
                    r = next(r for r in rec["rows"] if r["method"] == meth and r["sparsity"] == sp)
                    row.append(f"{r['acc']:.4f} ({r['agree']:.3f})")
                    if "acc_bn" in r:
                        row.append(f"{r['acc_bn']:.4f} ({r['agree_bn']:.3f})")
                row.append(f"{sum(r['seconds'] for r in rec['rows'] if r['method'] == meth) / len(sps):.1f}")
                rows.append(row)
            has_bn = "acc_bn" in rec["rows"][0]
            cols = []
            for sp in sps:
                cols.append(f"acc (agree) @ {sp:.0%}")
                if has_bn:
                    cols.append(f"+ BN re-cal @ {sp:.0%}")
            parts.append(md_table(["method (selection + allocation)"] + cols + ["s / run"], rows))
            if has_bn:
                parts.append("\n*BN re-cal*: BatchNorm running statistics re-estimated on 512 other training images "
                             "after pruning (no weight changes), the same for every method.\n")
            parts.append(f"\nRD curve measurement: {rec['rd_curve_seconds_max']:.1f} s (max), "
                         f"{rec['rd_curve_seconds_mean']:.1f} s (mean), once per model (the RD rows' time is the DP "
                         f"and masking only; the oViT rows' time includes collecting the gradients). *layers ≤ 95%*: "
                         f"the same curves without grid points above 95% (`max_sparsity=0.95`), so no layer is removed "
                         f"whole — not the paper's setting.\n")
            if "size_sparse" in rec:
                a, b = rec["size_dense"], rec["size_sparse"]
                parts.append(f"\nSize on disk (safetensors, whole model, global magnitude at {max(sps):.0%}): dense "
                             f"{a['raw_bytes']} B raw / {a['gzip_bytes']} B gzip / {a['zip_bytes']} B zip; sparse "
                             f"{b['raw_bytes']} B raw / {b['gzip_bytes']} B gzip / {b['zip_bytes']} B zip "
                             f"(non-zero fraction {b['nonzero_fraction']:.3f}; values + 1-bit bitmap estimate "
                             f"{b['bitmap_estimate_bytes']} B). Zeros do not shrink the raw file.\n")
    r = cache.get("rd")
    if r:
        s = r["settings"]
        parts.append("\n## RD allocation cost on ResNet-50 and DeiT-S (CPU, random weights)\n\n")
        parts.append(f"- measured run: {s['calib_images']} Gaussian-noise images at {s['resolution']}×{s['resolution']} "
                     f"(DeiT-S built with `img_size={s['resolution']}`: same weights, fewer tokens), grid {s['grid']} "
                     f"points on [0, 1], target sparsity {s['sparsity']}, distortion = max over samples, "
                     f"{s['threads']} thread(s). At the brief's 32 images × 224 one forward pass takes seconds here, "
                     f"so the full-setting curve time is *extrapolated* = layers × grid points × one measured 32×224 "
                     f"forward (curve cost is exactly that many forwards; nothing else grows).\n"
                     f"- peak memory: RSS sampled every 5 ms, increase over the RSS before the call (model and "
                     f"calibration data already loaded).\n\n")
        rows = []
        for name, rec in r["models"].items():
            rows.append([f"`{name}`", rec["layers"], f"{rec['prunable_weights']:,}", f"{rec['total_seconds']:.0f}",
                         f"{rec['forwards']} × {rec['forward_seconds']:.2f}", f"{rec['dp_seconds']:.2f}",
                         f"{rec['unit']} / {rec['states']:,} / {mb(rec['table_bytes'])}", f"{rec['peak_rss_delta_mb']:.0f}",
                         f"{rec['dp101_seconds']:.2f} / {mb(rec['dp101_table_bytes'])}",
                         f"{rec['forward_32x224_seconds']:.1f}", f"{rec['forward_32x224_peak_rss_delta_mb']:.0f}",
                         f"{rec['extrapolated_curve_seconds_32x224_grid21'] / 60:.0f} / "
                         f"{rec['extrapolated_curve_seconds_32x224_grid101'] / 60:.0f}",
                         f"{rec['sparsity_min']:.2f}–{rec['sparsity_max']:.2f}"])
        for name, rec in r["models"].items():
            if "env" in rec and rec["env"]["command"] != d["env"]["command"]:
                parts.append(f"- `{name}`: `{rec['env']['command']}` — {rec['env']['date']}, load "
                             f"{rec['env']['loadavg_start']}\n")
        parts.append("\n")
        parts.append(md_table(["model", "layers", "prunable weights", "allocation s (measured)",
                               "forwards × s each", "DP + fill s", "DP unit / states / argmin table MB",
                               "peak RSS +MB", "DP at 101 pts: s / table MB", "one 32×224 forward s",
                               "32×224 forward peak RSS +MB", "extrapolated curves at 32×224, grid 21 / 101: min",
                               "per-layer sparsity range"], rows))
    o = cache.get("ovit")
    if o:
        runs = _ovit_runs(o)
        parts.append("\n## oViT memory and time on DeiT-S (CPU, one thread)\n\n")
        parts.append("- DeiT-S built with `img_size=112` (random weights; Gaussian images, random labels), "
                     "all 48 qkv/proj/fc1/fc2 layers, global threshold at 50%, damping 1e-8; peak RSS sampled "
                     "every 5 ms, increase over the RSS before the call; phase times are wall-clock on the shared "
                     "machine (see the load), the CPU column is the process's CPU time\n")
        for label, rec in runs.items():
            if "env" in rec:
                parts.append(f"- {label}: `{rec['env']['command']}` — {rec['env']['date']}, load "
                             f"{rec['env']['loadavg_start']}\n")
        rows = []
        for label, rec in runs.items():
            rows.append([f"{rec['num_grads']} × {rec['batch']}", rec["block_size"], rec["dtype"], rec["fisher"],
                         "—" if not rec.get("max_fisher_mb") else f"{rec['max_fisher_mb']:g}",
                         f"{rec['groups']} / {rec['gradient_rounds']}",
                         mb(rec.get("max_group_fisher_bytes", rec.get("grad_bytes", 0))),
                         f"{rec['grad_seconds']:.0f}" + (f" ({rec['accumulate_seconds']:.0f})"
                                                         if rec.get("accumulate_seconds") else ""),
                         f"{rec['sweep_seconds']:.0f}", f"{rec['apply_seconds']:.0f}",
                         f"{rec['total_seconds']:.0f}"
                         + (f" / {rec['cpu_seconds']:.0f}" if "cpu_seconds" in rec else ""),
                         f"{rec['peak_rss_delta_mb']:.0f}", f"{_ovit_model_mb(rec):.0f}",
                         f"{rec['achieved_sparsity']:.3f}"])
        parts.append("\n")
        parts.append(md_table(["m × batch", "block B", "dtype", "Fisher held as", "max_fisher_mb",
                               "groups / gradient rounds", "Fisher held at once MiB", "gradients s (of which "
                               "accumulation)", "pass 1 (sweep) s", "pass 2 (replay) s", "total s wall / CPU",
                               "peak RSS +MiB", "memory model MiB", "sparsity"], rows))
        parts.append("\nMemory model (d = 21,233,664 prunable weights): Fisher information of one group — "
                     "`gradients`: m·d·4 B; `blocks`: d·B·sizeof(dtype) + a (B/4)·d·4 B buffer of gradients for "
                     "the rank-k updates — plus 6 B per weight (removal order and losses), one copy of the updated "
                     "weights (4 B per weight) and one chunk of F⁻¹ (≤ 256 MiB, ×~3 with temporaries). With "
                     "`max_fisher_mb` the groups hold at most that much; every group then needs two rounds of m "
                     "gradient passes (pass 1 and pass 2) instead of one for all layers.\n")
        best = max((r for r in runs.values() if r["fisher"] == "blocks" and r["groups"] == 1),
                   key=lambda r: r["num_grads"] * r["block_size"], default=None)
        if best:
            e = _ovit_extrapolation(best)
            parts.append(f"\n**Extrapolation to the paper's B = 192, m = 4096 at 224×224** (from the run with "
                         f"m = {best['num_grads']}, B = {best['block_size']}, {best['dtype']}; not measured): "
                         f"Fisher blocks {e['blocks_gb']:.1f} GiB in {best['dtype']} + {e['buffer_gb']:.1f} GiB "
                         f"accumulation buffer (vs {e['gradients_gb']:.0f} GiB for the gradient matrix), or any "
                         f"smaller `max_fisher_mb` at two gradient rounds per group. Time on one core of this "
                         f"CPU: gradient passes ≈ {e['grad_pass_hours']:.1f} h per round (m × per-pass time × "
                         f"~4.3 for 197 vs 50 tokens), accumulation ≈ {e['accumulate_hours']:.1f} h (∝ m·B), "
                         f"OBS sweep + replay ≈ {e['obs_hours']:.1f} h (∝ B²) — a GPU job, as in the paper.\n")
    gr = cache.get("gradual")
    if gr:
        s_ = gr["settings"]
        parts.append("\n## Gradual vs one-shot with the same fine-tuning budget (real digits)\n\n")
        parts.append(f"- command: `{gr['env']['command']}` — {gr['env']['date']}, load {gr['env']['loadavg_start']}\n"
                     f"- Small CNN as above, trained {s_['epochs']} epochs (dense accuracy {gr['dense_acc']:.4f} on "
                     f"the {s_['val_items']} held-out MNIST digits); every variant then gets the same {s_['steps']} "
                     f"AdamW steps (batch 64, lr {s_['lr']:g}, cosine to 0) to reach {s_['sparsity']:.0%} of the "
                     f"prunable weights, masks re-applied after every step\n"
                     f"- one-shot: prune at step 0, then fine-tune all {s_['steps']} steps; gradual: cubic schedule "
                     f"from {s_['initial']:.0%} at step 0 to {s_['sparsity']:.0%} at {s_['end']:.0%} of the steps, "
                     f"pruning every {s_['frequency']} steps (the plain-loop callback API: `OViTCallback` / the "
                     f"magnitude `WeightPruningCallback`), then recovery fine-tuning at fixed sparsity\n"
                     f"- oViT: m = {s_['num_grads']} mini-batch gradients of {s_['batch']} training images (the same "
                     f"fixed batches at every pruning step), B = {s_['block_size']}, damping {s_['damping']:g}\n\n")
        parts.append(md_table(["method", "acc right after pruning", "acc after fine-tuning", "sparsity",
                               "pruning steps", "s"],
                              [[r["method"], "—" if r["acc_after_prune"] is None else f"{r['acc_after_prune']:.4f}",
                                f"{r['acc']:.4f}", f"{r['sparsity']:.3f}", r["pruning_events"], f"{r['seconds']:.0f}"]
                               for r in gr["rows"]]))
    sm = cache.get("semi24")
    if sm:
        parts.append("\n## 2:4 semi-structured sparsity on GPU (DeiT-S linear layers)\n\n")
        parts.append(f"- command: `{sm['env']['command']}` — {sm['env']['date']}\n")
        if not sm.get("measured"):
            parts.append(f"- not measured: {sm['reason']}. Run `benchmarks/weight_pruning.py --parts semi24` on a "
                         "machine with a CUDA GPU (Ampere or newer) to fill this section.\n")
        else:
            parts.append(f"- {sm['device']}, batch {sm['batch']} × {sm['tokens']} tokens, median of {sm['iters']} "
                         "timed iterations after warm-up, dense `F.linear` vs `to_sparse_semi_structured` weights "
                         "(2:4 magnitude mask) in the same process\n\n")
            parts.append(md_table(["layer (in → out)", "dtype", "dense ms", "2:4 ms", "speed-up", "max abs diff"],
                                  [[r["layer"], r["dtype"], f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}",
                                    f"{r['dense_ms'] / r['sparse_ms']:.2f}×", f"{r['max_abs_diff']:.2e}"]
                                   for r in sm["rows"]]))
    if cache.get("summary"):
        parts.append("\n## Summary\n\n" + cache["summary"] + "\n")
    return "".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                   help="parts to run (none: only re-compose the results file from the cache)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hf_prune_weight_pruning.json"))
    p.add_argument("--output", default=str(RESULTS / "weight_pruning.md"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--vit-epochs", type=int, default=None, help="epochs for the tiny ViT (default: --epochs)")
    p.add_argument("--vit-patch", type=int, default=7)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--grid", type=int, default=41)
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--damping", type=float, default=1e-8)
    p.add_argument("--rd-images", type=int, default=8)
    p.add_argument("--rd-res", type=int, default=112)
    p.add_argument("--rd-grid", type=int, default=11)
    p.add_argument("--rd-models", nargs="+", default=["resnet50", "deit_small_patch16_224"],
                   help="run each in its own process for clean peak-RSS numbers")
    p.add_argument("--large-num-grads", type=int, default=256)
    p.add_argument("--ovit-batch", type=int, default=2, help="images per mini-batch gradient (ovit part)")
    p.add_argument("--large-block-size", type=int, default=64)
    p.add_argument("--ovit-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--fisher", default="auto", choices=["auto", "gradients", "blocks"])
    p.add_argument("--max-fisher-mb", type=float, default=None)
    p.add_argument("--gradual-steps", type=int, default=250, help="fine-tuning steps for every gradual-part variant")
    p.add_argument("--gradual-sparsity", type=float, default=0.9)
    p.add_argument("--gradual-epochs", type=int, default=4, help="dense training epochs (gradual part)")
    p.add_argument("--gradual-lr", type=float, default=1e-3)
    p.add_argument("--gradual-num-grads", type=int, default=64)
    p.add_argument("--gradual-initial", type=float, default=0.4, help="the paper's cubic schedule starts at 40%%")
    p.add_argument("--gradual-end", type=float, default=0.6, help="fraction of the steps where the target is reached")
    p.add_argument("--gradual-frequency", type=int, default=25)
    p.add_argument("--semi-batch", type=int, default=256)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--summary", default=None, help="markdown file whose text becomes the Summary section")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    env = env_info()
    if args.parts:
        cache["env"] = env
    if args.summary:
        cache["summary"] = Path(args.summary).read_text().strip()
        cache_path.write_text(json.dumps(cache, indent=1, default=str))
    for part in args.parts:
        res = {"digits": part_digits, "rd": part_rd, "ovit": part_ovit, "gradual": part_gradual,
               "semi24": part_semi24}[part](args)
        res["env"] = env
        if cache_path.is_file():  # another process may have cached a part while this one ran
            cache = {**json.loads(cache_path.read_text()), "env": env}
        if part == "ovit":
            for rec in res["runs"].values():
                rec["env"] = env
            if "ovit" in cache:  # keep configurations measured in an earlier run
                res["runs"] = {**_ovit_runs(cache["ovit"]), **res["runs"]}
        if part in ("digits", "rd") and part in cache:  # keep models measured in an earlier run
            for name, rec in res["models"].items():
                rec["env"] = env
                rec["settings"] = res["settings"]
            res["models"] = {**cache[part]["models"], **res["models"]}
        cache[part] = res
        cache_path.write_text(json.dumps(cache, indent=1, default=str))
    if not args.no_write:
        Path(args.output).write_text(compose(cache))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
