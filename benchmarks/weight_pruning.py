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
* ``ovit``: oViT on DeiT-S at small m: time per phase and peak RSS.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/weight_pruning.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, env_info, header_md, md_table  # noqa: E402
from hf_prune.methods import ovit as ovit_mod  # noqa: E402
from hf_prune.methods import rd as rd_mod  # noqa: E402
from hf_prune.methods.weight_allocation import prune_weights  # noqa: E402
from hf_prune.weight_masks import WeightMasks, prunable_layers, safetensors_size  # noqa: E402

PARTS = ("digits", "rd", "ovit")


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


@torch.no_grad()
def recalibrate_bn(model, images, batch_size=128):
    """Re-estimate BatchNorm running statistics on ``images`` (cumulative average); no-op without BN."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size])
    model.eval()
    return True


# ----------------------------------------------------------------------------------------- digits


def part_digits(args) -> dict:
    from hf_prune.data import load_digits

    train_split, val = load_digits(source="mnist", image_size=28, channels=1, seed=0)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(train_split), generator=g)
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
                    stats = prune_weights(model, method="magnitude", sparsity=sparsity, allocation=alloc)
                    label = f"magnitude + {alloc}"
                elif method == "rd":
                    stats = prune_weights(model, method="rd", sparsity=sparsity, calib=rd_calib, curves=curves[alloc])
                    label = ("RD (max, layers ≤ 95%) + magnitude" if alloc == "max-cap95"
                             else f"RD ({alloc} over samples) + magnitude")
                else:
                    stats = prune_weights(model, method="ovit", sparsity=sparsity, calib=ov_calib, allocation=alloc,
                                          block_size=args.block_size, num_grads=m, damping=args.damping,
                                          num_threads=1)
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


def part_ovit(args) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=args.rd_res).eval()
    m = args.large_num_grads
    calib = [(torch.randn(args.ovit_batch, 3, args.rd_res, args.rd_res), torch.randint(0, 1000, (args.ovit_batch,)))
             for _ in range(m)]
    info = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        stats = prune_weights(model, method="ovit", sparsity=0.5, calib=calib, block_size=args.large_block_size,
                              num_grads=m, damping=1e-8, num_threads=1, info=info)
        total = time.perf_counter() - t0
    rec = {"model": "deit_small_patch16_224", "img_size": args.rd_res, "num_grads": m, "batch": args.ovit_batch,
           "block_size": args.large_block_size, "dtype": "float64", "chunk_bytes": 256 << 20,
           "prunable_weights": stats["num_weights"], "achieved_sparsity": stats["global_sparsity"],
           "total_seconds": total, "peak_rss_delta_mb": mem.delta_mb, "rss_base_mb": mem.base / 2 ** 20,
           **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
    print(f"[ovit] {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()})}", flush=True)
    return rec


# ----------------------------------------------------------------------------------------- report


def _fmt(x, nd=4):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def compose(cache: dict) -> str:
    info = dict(cache.get("env", {}))
    cmds = []
    for key in ("rd", "ovit", "digits"):
        part = cache.get(key) or {}
        envs = [rec.get("env") for rec in part.get("models", {}).values()] if key == "rd" else [part.get("env")]
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
        parts.append("\n## oViT memory and time on DeiT-S (CPU, small m)\n\n")
        parts.append(f"- command: `{o['env']['command']}` — {o['env']['date']}, load {o['env']['loadavg_start']}\n\n")
        parts.append(md_table(["model", "m × batch", "block B", "prunable weights", "gradients MB", "grad s",
                               "pass 1 (sweep) s", "pass 2 (apply) s", "total s", "peak RSS +MB", "sparsity"],
                              [[f"`{o['model']}` (img {o['img_size']})", f"{o['num_grads']} × {o['batch']}",
                                o["block_size"], f"{o['prunable_weights']:,}", mb(o["grad_bytes"]),
                                f"{o['grad_seconds']:.0f}", f"{o['sweep_seconds']:.0f}", f"{o['apply_seconds']:.0f}",
                                f"{o['total_seconds']:.0f}", f"{o['peak_rss_delta_mb']:.0f}",
                                f"{o['achieved_sparsity']:.3f}"]]))
        parts.append("\nMemory model: gradients m·d·4 B + removal order and losses 6 B per weight + one chunk of "
                     f"F⁻¹ (≤ {o['chunk_bytes'] >> 20} MiB, with temporaries ~3×). The paper's B = 192, m = 4096 would "
                     "need 4096·22M·4 B ≈ 360 GB of gradients kept this way: at that scale gradients must be "
                     "accumulated into the per-block Fisher on the fly (d·B floats ≈ 16 GB fp32), which this "
                     "implementation does not do.\n")
    if cache.get("summary"):
        parts.append("\n## Summary\n\n" + cache["summary"] + "\n")
    return "".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                   help="parts to run (none: only re-compose the results file from the cache)")
    p.add_argument("--cache", default="/tmp/hf_prune_weight_pruning.json")
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
    p.add_argument("--large-num-grads", type=int, default=8)
    p.add_argument("--ovit-batch", type=int, default=8)
    p.add_argument("--large-block-size", type=int, default=32)
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
        res = {"digits": part_digits, "rd": part_rd, "ovit": part_ovit}[part](args)
        res["env"] = env
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
