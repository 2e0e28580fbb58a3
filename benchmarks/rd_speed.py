"""RD allocation speed: distortion curves with prefix reuse and grid batching vs one plain forward pass per
grid point, on a pretrained EfficientNet-Lite1 (real photos) and a timm ResNet-50 (random weights).

Parts (``--parts``, default both; each part's numbers are kept in ``benchmarks/results/rd_speed.json`` so
parts can run one per process and the results file is re-composed from all of them; ``--cache PATH``
writes elsewhere and prints the table instead, for dry runs):

* ``effnet``: timm ``efficientnet_lite1`` with its ImageNet weights
  (:func:`benchmarks.pretrained_models.load_efficientnet_lite`), calibration and held-out images are
  random 240×240 crops of the real photos of :func:`benchmarks.pretrained_models.photos` (disjoint
  crops, normalised with the model's mean/std). ``allocate_rd`` at 70% is timed end to end (curves,
  DP, fill); the pruned model's top-1 agreement with the dense one on the held-out crops is compared
  with global magnitude and LAMP at the same sparsity.
* ``resnet50``: timm ``resnet50`` (random weights, ``zero_init_last=False``) at 224×224 with Gaussian-noise
  calibration images (the paper's zero-data variant); ``allocate_rd`` at 50% timed end to end.

*Before* is the previous implementation's cost, one plain forward pass of the calibration set per
grid point and layer (``reuse_prefix=False``): it is measured on the first ``--before-layers``
layers and extrapolated to all layers by counting forward passes (a plain pass costs the same for
every layer). On those layers the fast curves are also compared with the plain ones.

* ``tinyvit``: the tiny ViT of ``benchmarks/weight_pruning.py`` (4 blocks, width 96, 442K prunable weights)
  after one epoch on real MNIST digits, 256 calibration digits, grid 21, 70%: small activations, where
  several grid points per pass pay off.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/rd_speed.py --parts effnet``.
Timings on a shared machine depend on its load, which the results file records for every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, header_md, md_table, run_parts  # noqa: E402
from hf_prune.methods.rd import curves as rd  # noqa: E402
from hf_prune.sparse.allocation import allocate_global, allocate_lamp  # noqa: E402
from hf_prune.sparse.masks import WeightMasks, prunable_layers, select_magnitude  # noqa: E402

PARTS = ("effnet", "resnet50", "tinyvit")


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def photo_crops(mean, std, size: int, per_photo: int, seed: int = 0) -> torch.Tensor:
    """Random ``size``×``size`` crops of every real photo (shorter side resized to ``1.13·size``)."""
    import torch.nn.functional as F

    from benchmarks.pretrained_models import photos

    g = torch.Generator().manual_seed(seed)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = []
    for p in photos().values():
        h, w = p.shape[1:]
        scale = 1.13 * size / min(h, w)
        p = F.interpolate(p[None], size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                          antialias=True)[0]
        for _ in range(per_photo):
            i = int(torch.randint(0, p.shape[1] - size + 1, (1,), generator=g))
            j = int(torch.randint(0, p.shape[2] - size + 1, (1,), generator=g))
            out.append((p[:, i:i + size, j:j + size] - m) / s)
    x = torch.stack(out)
    return x[torch.randperm(len(x), generator=g)]


def _batches(x: torch.Tensor, batch: int, channels_last: bool) -> list:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(x[i:i + batch].contiguous(memory_format=fmt), None) for i in range(0, len(x), batch)]


def time_allocation(model, calib, sparsity: float, *, grid: int, before_layers: int) -> dict:
    """``allocate_rd`` timed end to end, and the plain-pass cost measured on the first layers."""
    layers = list(prunable_layers(model))
    info: dict = {}
    load0 = _loadavg()
    t0 = time.perf_counter()
    alloc = rd.allocate_rd(model, sparsity, calib, layers=layers, grid=grid, info=info, show_progress=False)
    after = time.perf_counter() - t0
    load1 = _loadavg()
    curves = info["curves"]
    sub = layers[:before_layers]
    t1 = time.perf_counter()
    plain = rd.distortion_curves(model, calib, layers=sub, grid=grid, reuse_prefix=False, show_progress=False)
    plain_s = time.perf_counter() - t1
    per_forward = plain_s / plain.forwards
    n_batches = len(calib)
    plain_forwards = n_batches * (1 + sum(len(ks) - 1 for ks in curves.pruned))
    diff = max((abs(a - b) for da, db in zip(curves.distortion, plain.distortion) for a, b in zip(da, db)),
               default=0.0)  # the same layers come first in both
    top = max((max(db) for db in plain.distortion), default=0.0)
    return {"layers": len(layers), "prunable_weights": sum(curves.sizes), "grid": grid,
            "calib_images": sum(int(c[0].shape[0]) for c in calib), "batches": n_batches,
            "after_seconds": after, "curve_seconds": info["curve_seconds"], "dp_seconds": info["dp_seconds"],
            "after_passes": curves.forwards, "max_variants_per_pass": curves.extra["max_variants_per_pass"],
            "fallback_layers": curves.extra["fallback_layers"], "load_during_after": [load0, load1],
            "before_layers_measured": len(sub), "before_seconds_measured": plain_s,
            "before_forward_seconds": per_forward, "before_forwards": plain_forwards,
            "before_seconds_extrapolated": per_forward * plain_forwards,
            "speedup": per_forward * plain_forwards / after, "max_abs_diff_fast_vs_plain": diff,
            "max_plain_distortion": top,
            "after_in_plain_passes": after / per_forward,
            "allocation": alloc, "sparsity_min": min(alloc.values()), "sparsity_max": max(alloc.values()),
            "curves": curves.to_dict()}


@torch.no_grad()
def _agreement(model, dense_pred, x, batch: int, channels_last: bool) -> float:
    pred = torch.cat([model(b).argmax(-1) for b, _ in _batches(x, batch, channels_last)])
    return float((pred == dense_pred).float().mean())


@torch.no_grad()
def fidelity(model, held_out: torch.Tensor, sparsities, curves: rd.RDCurves, *, channels_last: bool) -> dict:
    """Top-1 agreement with the dense model on held-out crops, ``{sparsity: {method: agreement}}``: RD (the
    measured curves re-used for every sparsity, RD's own order) vs global magnitude and LAMP."""
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    dense_pred = torch.cat([model(b).argmax(-1) for b, _ in _batches(held_out, 16, channels_last)])
    layers = list(prunable_layers(model))
    weights = {n: dict(model.named_modules())[n].weight for n in layers}
    out = {}
    for sparsity in sparsities:
        out[sparsity] = {}
        for name in ("rd", "global", "lamp"):
            model.load_state_dict(dense)
            wm = WeightMasks(model, layers)
            if name == "rd":
                rd.apply_rd_allocation(wm, rd.allocate_rd(model, sparsity, layers=layers, curves=curves))
            else:
                alloc = (allocate_global if name == "global" else allocate_lamp)(weights, sparsity)
                for n in layers:
                    wm.set(n, select_magnitude(wm.weight(n), alloc[n]))
            wm.enforce()
            out[sparsity][name] = _agreement(model, dense_pred, held_out, 16, channels_last)
    model.load_state_dict(dense)
    return out


def part_effnet(args) -> dict:
    from benchmarks.pretrained_models import load_efficientnet_lite

    model = load_efficientnet_lite(1)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = model.pretrained_cfg
    x = photo_crops(cfg["mean"], cfg["std"], 240, args.crops_per_photo)
    calib = _batches(x[:args.images], args.batch, args.channels_last)
    rec = time_allocation(model, calib, 0.7, grid=args.grid, before_layers=args.before_layers)
    rec["held_out_images"] = len(x) - args.images
    curves = rd.RDCurves(**{k: rec["curves"][k] for k in ("names", "sizes", "pruned", "distortion", "reduction")})
    rec["agreement"] = fidelity(model, x[args.images:], (0.3, 0.5, 0.7), curves, channels_last=args.channels_last)
    return rec


def part_resnet50(args) -> dict:
    import timm

    torch.manual_seed(0)
    # zero_init_last=False: with timm's default zero-initialised last BatchNorm of every block the random
    # network's residual branches contribute nothing and most distortion curves are exactly zero
    model = timm.create_model("resnet50", pretrained=False, zero_init_last=False).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.resnet_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return time_allocation(model, _batches(x, args.batch, args.channels_last), 0.5, grid=args.grid,
                           before_layers=args.before_layers)


def part_tinyvit(args) -> dict:
    """The tiny ViT of ``benchmarks/weight_pruning.py`` trained briefly on real MNIST digits: small
    activations, where a forward pass costs its per-operation overhead and grid batching pays."""
    from benchmarks.weight_pruning import mnist_splits, tiny_vit, train

    train_split, _, perm = mnist_splits()
    torch.manual_seed(0)
    model = train(tiny_vit(), train_split, epochs=1, lr=2e-3).eval()
    idx = perm[:args.tiny_images]
    calib = [(train_split.pixel_values[idx[i:i + 64]], None) for i in range(0, len(idx), 64)]
    return time_allocation(model, calib, 0.7, grid=args.tiny_grid, before_layers=args.before_layers)


def compose(cache: dict) -> str:
    runs = cache.get("runs", {})
    info = next(iter(runs.values()))["env"] if runs else env_info()
    notes = ["each part ran in its own process; every row lists its command, date and load",
             "after = `allocate_rd` end to end (curves with prefix reuse and grid batching, DP, fill); before = "
             "one plain forward pass per grid point (`reuse_prefix=False`, the previous implementation's method), "
             "measured on the first layers and extrapolated by counting forward passes",
             "after in plain passes = after s / one plain forward pass of the calibration set, both measured in the "
             "same run: a cost that does not depend on the machine's load (multiply by an unloaded pass time for an "
             "unloaded estimate)"]
    md = header_md("RD allocation speed: prefix reuse and grid batching", info, notes)
    rows = []
    for part, r in runs.items():
        d = r["result"]
        rows.append([part, d["layers"], f"{d['prunable_weights']:,}", f"{d['calib_images']} in {d['batches']}",
                     d["grid"], f"{d['before_seconds_extrapolated']:.0f}", f"{d['after_seconds']:.0f}",
                     f"{d['speedup']:.2f}x", f"{d.get('after_in_plain_passes', float('nan')):.0f}",
                     f"{d['before_forward_seconds']:.2f}", f"{d['dp_seconds']:.2f}", d["max_variants_per_pass"],
                     f"{d['max_abs_diff_fast_vs_plain']:.1e} / {d['max_plain_distortion']:.1e} "
                     f"({d['before_layers_measured']} layers)",
                     len(d["fallback_layers"]), f"{d['sparsity_min']:.2f}-{d['sparsity_max']:.2f}",
                     " / ".join(d["load_during_after"])])
    md += "\n" + md_table(["part", "layers", "prunable weights", "calib images in batches", "grid points",
                           "before s (extrapolated)", "after s", "speed-up", "after in plain passes",
                           "one plain pass s", "DP s", "grid points per pass",
                           "max abs diff fast vs plain / largest distortion", "layers on plain passes",
                           "per-layer sparsity",
                           "load at start / end of after"], rows)
    for part, r in runs.items():
        md += f"\n- `{part}`: `{r['env']['command']}` — {r['env']['date']}, load at start {r['env']['loadavg_start']}, "
        md += f"torch threads {r['env']['torch_threads']}, channels_last {r['args']['channels_last']}\n"
        if "agreement" in r["result"]:
            md += (f"  - top-1 agreement with the dense model on {r['result']['held_out_images']} held-out photo crops "
                   "(one-shot, no BatchNorm re-calibration, no fine-tuning; RD re-uses the same curves): "
                   + "; ".join(f"{float(s):.0%}: RD {a['rd']:.3f}, global magnitude {a['global']:.3f}, LAMP "
                               f"{a['lamp']:.3f}" for s, a in r["result"]["agreement"].items()) + "\n")
    return md


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=16, help="EfficientNet calibration crops")
    p.add_argument("--resnet-images", type=int, default=8, help="ResNet-50 noise calibration images")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tiny-images", type=int, default=256, help="tiny ViT calibration digits (batches of 64)")
    p.add_argument("--tiny-grid", type=int, default=21)
    p.add_argument("--grid", type=int, default=11)
    p.add_argument("--crops-per-photo", type=int, default=8)
    p.add_argument("--before-layers", type=int, default=3)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="run the models in channels_last (the fast layout for CPU convolutions)")
    p.add_argument("--cache", help="results of earlier parts, re-used (default: results/rd_speed.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def announced(name, run):
        def part(a):
            result = run(a)
            print(f"[{name}] " + json.dumps({k: v for k, v in result.items() if k != "allocation"}, default=str),
                  flush=True)
            return result
        return part

    parts = {"effnet": part_effnet, "resnet50": part_resnet50, "tinyvit": part_tinyvit}
    run_parts("rd_speed", {n: announced(n, f) for n, f in parts.items()}, args, compose, cache=args.cache)

if __name__ == "__main__":
    main()
