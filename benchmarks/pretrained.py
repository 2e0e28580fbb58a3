"""Do pretrained models stay usable after pruning? ImageNet EfficientNet-Lite1/2 on real photos.

For each model, structured pruning to 90 / 80 / 70 / 50 % of the dense MACs and weight pruning to
50 / 70 / 90 % sparsity, each measured as it is cut and after every repair step:

* structured: ``plain`` (DepGraph, l2, hf_prune's defaults), ``plain + BN recalibration`` (the usual
  cheap fix), ``+ reconstruction`` (:func:`hf_prune.engine.reconstruct.reconstruct`, no BN step),
  ``+ reconstruction + BN recalibration`` (all BNs re-estimated on the calibration views),
  ``+ reconstruction + BN mean correction`` (``bn="mean"``, the default), the same re-fitting every
  layer after the first pruned one (``layers="all"``), the same with ``activation`` importance, and ``+ N distillation steps`` (:func:`hf_prune.recover`) on the best one-shot row; Torch-Pruning's default
  recipe at the same MACs (its uniform channel ratio found by bisection), plain and with BN
  recalibration;
* weight pruning: uniform magnitude (what ``torch.nn.utils.prune`` does per layer), hf_prune's global
  magnitude, + BN mean correction or + BN recalibration, + reconstruction (each layer's kept weights
  re-fitted to the dense layer's outputs, pruned weights held at zero) with BN mean correction, LAMP's
  layer allocation (Lee et al., 2021: magnitude rescaled so that no layer is emptied) plain and + BN
  recalibration, oViT
  (data-aware OBS with weight updates; gradients of the cross-entropy on the dense model's own top-1,
  so no labels) and + BN correction (``--no-ovit`` skips both: they take the longest), + N
  distillation steps on the best one-shot row.

Data: the real photos that ship in installed packages (``benchmarks/pretrained_models.photos``),
split into calibration photos and held-out evaluation photos; calibration, distillation and
evaluation all use random resized crops and flips, evaluation views come from the held-out photos
only. Metrics: top-1 agreement with the dense model, top-5 agreement (the dense top-1 among the
pruned model's five best), and KL(dense || pruned) in nats. Latency (ms, median of interleaved
runs in one process) at batch 1 and 32 beside MACs for every distinct structure.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/pretrained.py                # the full table (hours on 2 cores)
    PYTHONPATH=. .venv/bin/python benchmarks/pretrained.py --quick        # a few minutes, to check the script

Results: ``benchmarks/results/pretrained.{md,json}`` (``--out`` changes the stem). Every finished row
is written to the JSON at once; ``--resume`` skips the rows it already holds, and ``--resume --redo
"+ distillation"`` computes the named rows again (for the models and targets of the run) after a
change of recipe.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, env_info, header_md, md_table, median, time_interleaved,  # noqa: E402
                               torch_pruning_available, tp_prune)
from benchmarks.pretrained_models import SKIMAGE_EXTRA, extra_images, load_efficientnet_lite, photos  # noqa: E402

CALIB_PHOTOS = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle", "flower")
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "china", "grace_hopper")
STRUCTURED_ROWS = ["plain", "plain + BN recalibration", "+ reconstruction", "+ reconstruction + BN recalibration",
                   "+ reconstruction + BN mean correction", "+ reconstruction (all layers) + BN mean correction",
                   "activation importance (plain)", "activation importance + reconstruction + BN mean correction"]
TP_ROWS = ["Torch-Pruning", "Torch-Pruning + BN recalibration"]
WEIGHT_ROWS = ["uniform magnitude (per layer, like torch.nn.utils.prune)", "plain (global magnitude)",
               "+ BN mean correction", "+ BN recalibration", "+ reconstruction + BN mean correction",
               "LAMP allocation (magnitude)", "LAMP + BN recalibration"]
OVIT_ROWS = ["oViT (data-aware OBS + weight updates)", "oViT + BN mean correction"]


# ----------------------------------------------------------------------------------------- data


class Data:
    """Calibration views and raw calibration images (the pool for distillation), held-out evaluation views.

    The pool is the calibration photos plus skimage's other real images (grayscale photographs and
    textures); the evaluation photos are never in it.
    """

    def __init__(self, model, calib_views: int, eval_views: int):
        from hf_prune.recovery import random_views

        cfg = model.pretrained_cfg
        self.size = int(cfg["input_size"][-1])
        mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["std"]).view(3, 1, 1)
        pics = photos()
        missing = [p for p in CALIB_PHOTOS + EVAL_PHOTOS if p not in pics]
        if missing:
            raise RuntimeError(f"photos {missing} not found in the installed packages")
        self.pool = {p: pics[p] for p in CALIB_PHOTOS}
        self.pool.update(extra_images())
        g = torch.Generator().manual_seed(0)
        views = torch.cat([(random_views(im, calib_views, self.size, generator=g) - mean) / std
                           for im in self.pool.values()])
        self.calib = views[torch.randperm(len(views), generator=g)]  # every batch mixes images
        self.raw_calib = list(self.pool.values())
        g = torch.Generator().manual_seed(1)
        self.eval = torch.cat([(random_views(pics[p], eval_views, self.size, generator=g) - mean) / std
                               for p in EVAL_PHOTOS])
        self.example = self.calib[:1]

    def pseudo_labelled(self, dense, batch=24):
        """Calibration batches labelled with the dense model's top-1 (for oViT's gradients)."""
        with torch.no_grad():
            return [(x, dense(x).argmax(1)) for x in self.calib.split(batch)]


@torch.no_grad()
def logits(model, x, batch=32):
    model.eval()
    return torch.cat([model(c) for c in x.split(batch)])


def metrics(model, data: Data, dense_logits) -> dict:
    out = logits(model, data.eval)
    top1 = dense_logits.argmax(1)
    kl = F.kl_div(out.log_softmax(1), dense_logits.log_softmax(1), log_target=True, reduction="batchmean")
    return {"top1": float((out.argmax(1) == top1).float().mean()),
            "top5": float((out.topk(5, dim=1).indices == top1[:, None]).any(1).float().mean()),
            "kl": float(kl)}


# ----------------------------------------------------------------------------------------- cuts


def structured(dense, data: Data, target: float, importance: str):
    """DepGraph cut with hf_prune's defaults (global, round_to=8); returns (model, keep, macs ratio)."""
    from hf_prune.engine.importance import unit_scores
    from hf_prune.engine.pruner import StructuredPruner, with_repairs
    from hf_prune.engine.reconstruct import kept_indices

    model = copy.deepcopy(dense)

    def attempt(p):
        scores = unit_scores(p.graph, "activation", calib=data.calib) if importance == "activation" else None
        p.step(target_macs=target, scores=scores, compacted=True)

    pruner = with_repairs(model, lambda fm, fs: StructuredPruner(model, data.example, frozen_modules=fm,
                                                                 frozen_splits=fs), attempt)
    return model, kept_indices(pruner.graph, pruner.removed), pruner.stats()["macs_ratio"]


def macs(model, x) -> int:
    from hf_prune.metrics.profiling import count_macs

    return count_macs(model, x)


def tp_at(dense, data: Data, target: float, dense_macs: int, tol: float = 0.01):
    """Torch-Pruning's default recipe with the uniform channel ratio whose MACs are closest to ``target``."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        ratio = (lo + hi) / 2
        model = tp_prune(copy.deepcopy(dense), data.example, pruning_ratio=ratio)
        frac = macs(model, data.example) / dense_macs
        if best is None or abs(frac - target) < abs(best[2] - target):
            best = (model, ratio, frac)
        if abs(frac - target) <= tol:
            break
        lo, hi = (ratio, hi) if frac > target else (lo, ratio)
    return best


def bn_recalibrated(model, data: Data):
    from hf_prune.core.execution import recalibrate_batchnorm

    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    recalibrate_batchnorm(model, bns, data.calib.split(24), lambda x: model(x))
    return model


def reconstructed(model, dense, data: Data, keep, **options):
    from hf_prune.engine.reconstruct import reconstruct

    model = copy.deepcopy(model)
    stats = reconstruct(model, dense, data.calib.split(24), keep=keep, progress=False, **options)
    return model, stats


def distilled(model, dense, data: Data, args):
    import hf_prune

    model = copy.deepcopy(model)
    stats = hf_prune.recover(model, dense, data.raw_calib, steps=args.steps, lr=args.lr, batch_size=args.batch,
                             progress=False)
    return model, stats


def weight_pruned(dense, data: Data, sparsity: float, method: str, allocation: str | None = None):
    import hf_prune

    model = copy.deepcopy(dense)
    options = {}
    if method == "ovit":
        options = dict(calib=data.pseudo_labelled(dense), num_grads=args_global.ovit_grads, block_size=64)
    elif allocation:
        options = dict(allocation=allocation)
    hf_prune.prune(model, method=method, sparsity=sparsity, **options)
    return model


# ----------------------------------------------------------------------------------------- timing


def latency(variants: dict, size: int, args) -> dict:
    """Median ms per variant at batch 1 and 32, all variants interleaved in one loop."""
    out = {}
    for batch, iters in ((1, args.iters1), (32, args.iters32)):
        x = torch.randn(batch, 3, size, size)
        times = time_interleaved({k: (m, x) for k, m in variants.items()}, warmup=2, iters=iters)
        out[batch] = {k: median(v) for k, v in times.items()}
    return out


# ----------------------------------------------------------------------------------------- driver


class Results:
    def __init__(self, path: Path, resume: bool, info: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if resume and path.exists() else {"rows": [], "latency": []}
        self.data["env"] = info

    def has(self, **key) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.data["rows"])

    def complete(self, key: dict, rows: list, latency: bool) -> bool:
        """Every row of this setting (and its latency) is already there: ``--resume`` skips it."""
        timed = not latency or any(r.get("model") == key["model"] and r.get("target") == key["target"]
                                   for r in self.data["latency"])
        return timed and all(self.has(**key, row=r) for r in rows)

    def drop(self, forget) -> None:
        """Forget the rows for which ``forget(row)`` is true (``--redo``)."""
        self.data["rows"] = [r for r in self.data["rows"] if not forget(r)]

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def run_structured(variant, dense, data, dense_logits, dense_macs, target, args, res: Results):
    key = dict(model=f"efficientnet_lite{variant}", kind="structured", target=target)
    tp = torch_pruning_available() and not args.no_tp
    expected = STRUCTURED_ROWS + (["+ distillation"] if args.steps else []) + (TP_ROWS if tp else [])
    timed_before = any(r.get("model") == key["model"] and r.get("target") == target for r in res.data["latency"])
    if res.complete(key, expected, latency=True):
        return

    def done(name):
        return next((r for r in res.data["rows"] if all(r.get(k) == v for k, v in dict(key, row=name).items())), None)

    cuts: dict = {}

    def cut(importance):
        """The pruned model, its kept indices and the seconds the cut took (one cut per importance)."""
        if importance not in cuts:
            t = time.perf_counter()
            model, keep, _ = structured(dense, data, target, importance)
            cuts[importance] = (model, keep, time.perf_counter() - t)
        return cuts[importance]

    recipes = {  # row -> (importance, what is done to the cut model)
        "plain": ("l2", None),
        "plain + BN recalibration": ("l2", "recalibrate"),
        "+ reconstruction": ("l2", dict(bn=None, layers=args.layers)),
        "+ reconstruction + BN recalibration": ("l2", "reconstruct+recalibrate"),
        "+ reconstruction + BN mean correction": ("l2", dict(bn="mean", layers=args.layers)),
        "+ reconstruction (all layers) + BN mean correction": ("l2", dict(bn="mean", layers="all")),
        "activation importance (plain)": ("activation", None),
        "activation importance + reconstruction + BN mean correction": ("activation", dict(bn="mean", layers=args.layers)),
    }
    built: dict = {}

    def build(name):
        """(model, seconds) for a row, made on demand: rows already in the file are not rebuilt."""
        if name not in built:
            importance, step = recipes[name]
            pruned, keep, cut_s = cut(importance)
            t = time.perf_counter()
            if step is None:
                model, seconds = pruned, cut_s
            elif step == "recalibrate":
                model = bn_recalibrated(pruned, data)
            elif step == "reconstruct+recalibrate":
                model = bn_recalibrated(build("+ reconstruction")[0], data)
            else:
                model = reconstructed(pruned, dense, data, keep, **step)[0]
            built[name] = (model, seconds if step is None else time.perf_counter() - t)
        return built[name]

    def row(name, model, seconds, **extra):
        m = metrics(model, data, dense_logits)
        res.add(dict(key, row=name, **m, macs=macs(model, data.example) / dense_macs, seconds=round(seconds, 1), **extra))
        return m

    best = None
    for name in STRUCTURED_ROWS:
        m = done(name) or row(name, *build(name))
        if "reconstruction" in name and (  # distillation starts from the best re-fitted model
                best is None or m["top1"] > best[1]["top1"] or (m["top1"] == best[1]["top1"] and m["kl"] < best[1]["kl"])):
            best = (name, m)
    if args.steps and not done("+ distillation"):
        t = time.perf_counter()
        model, stats = distilled(build(best[0])[0], dense, data, args)
        row("+ distillation", model, time.perf_counter() - t, start=best[0], steps=args.steps, batch=args.batch,
            lr=args.lr, loss_first=stats["loss_first"], loss_last=stats["loss_last"])
    if tp and (not timed_before or not all(done(r) for r in TP_ROWS)):
        t = time.perf_counter()
        tp_model, ratio, _ = tp_at(dense, data, target, dense_macs)
        tp_s = time.perf_counter() - t
        if not done("Torch-Pruning"):
            row("Torch-Pruning", tp_model, tp_s, pruning_ratio=round(ratio, 4))
        if not done("Torch-Pruning + BN recalibration"):
            row("Torch-Pruning + BN recalibration", bn_recalibrated(tp_model, data), 0.0)
    else:
        tp_model = None
    if not timed_before:
        import os

        variants = {"dense": dense, "hf_prune (l2)": cut("l2")[0], "hf_prune (activation)": cut("activation")[0]}
        if tp_model is not None:
            variants["Torch-Pruning"] = tp_model
        lat = latency(variants, data.size, args)
        res.data["latency"].append(dict(model=key["model"], target=target, load=" ".join(f"{v:.2f}" for v in os.getloadavg()),
                                        macs={k: macs(m, data.example) / dense_macs for k, m in variants.items()},
                                        ms=lat))
        res.save()
        print(json.dumps(res.data["latency"][-1]), flush=True)


def run_weights(variant, dense, data, dense_logits, sparsity, args, res: Results):
    key = dict(model=f"efficientnet_lite{variant}", kind="weights", target=sparsity)
    names = WEIGHT_ROWS + ([] if args.no_ovit else OVIT_ROWS)
    if res.complete(key, names + (["+ distillation"] if args.steps else []), latency=False):
        return
    models = {}
    best = None
    plain, ovit = "plain (global magnitude)", "oViT (data-aware OBS + weight updates)"
    makers = {
        "uniform magnitude (per layer, like torch.nn.utils.prune)":
            lambda: weight_pruned(dense, data, sparsity, "magnitude", "uniform"),
        plain: lambda: weight_pruned(dense, data, sparsity, "magnitude"),
        "+ BN mean correction": lambda: reconstructed(models[plain], dense, data, None, layers=[], bn="mean")[0],
        "+ BN recalibration": lambda: bn_recalibrated(models[plain], data),
        "+ reconstruction + BN mean correction": lambda: reconstructed(models[plain], dense, data, None, bn="mean")[0],
        "LAMP allocation (magnitude)": lambda: weight_pruned(dense, data, sparsity, "magnitude", "lamp"),
        "LAMP + BN recalibration": lambda: bn_recalibrated(models["LAMP allocation (magnitude)"], data),
        ovit: lambda: weight_pruned(dense, data, sparsity, "ovit"),
        "oViT + BN mean correction": lambda: reconstructed(models[ovit], dense, data, None, layers=[], bn="mean")[0],
    }
    parent = {"+ BN mean correction": plain, "+ BN recalibration": plain, "+ reconstruction + BN mean correction": plain,
              "oViT + BN mean correction": ovit, "LAMP + BN recalibration": "LAMP allocation (magnitude)"}

    def build(name):
        if name not in models:
            if name in parent:
                build(parent[name])
            models[name] = makers[name]()
        return models[name]

    for name in names:
        stored = next((r for r in res.data["rows"] if all(r.get(k) == v for k, v in dict(key, row=name).items())), None)
        if stored is None:
            t = time.perf_counter()
            model = build(name)
            seconds = time.perf_counter() - t
            stored = dict(key, row=name, **metrics(model, data, dense_logits), seconds=round(seconds, 1))
            res.add(stored)
        if best is None or stored["top1"] > best[1]["top1"] or (stored["top1"] == best[1]["top1"]
                                                                  and stored["kl"] < best[1]["kl"]):
            best = (name, stored)
    if args.steps and not res.has(**key, row="+ distillation"):
        t = time.perf_counter()
        model, stats = distilled(build(best[0]), dense, data, args)
        m = metrics(model, data, dense_logits)
        res.add(dict(key, row="+ distillation", **m, seconds=round(time.perf_counter() - t, 1), start=best[0],
                     steps=args.steps, batch=args.batch, lr=args.lr, loss_first=stats["loss_first"],
                     loss_last=stats["loss_last"]))


args_global = None


def main(argv=None):
    global args_global
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="1,2")
    p.add_argument("--macs", default="0.9,0.8,0.7,0.5", help="structured targets (fraction of dense MACs kept)")
    p.add_argument("--sparsity", default="0.5,0.7,0.9", help="weight-pruning targets")
    p.add_argument("--calib-views", type=int, default=4, help="views per calibration image (16 images)")
    p.add_argument("--eval-views", type=int, default=24, help="views per evaluation photo (5 photos)")
    p.add_argument("--layers", default="consumers", help="reconstruct(layers=...)")
    p.add_argument("--steps", type=int, default=200, help="distillation steps (0: none)")
    p.add_argument("--batch", type=int, default=16, help="distillation batch size")
    p.add_argument("--lr", type=float, default=2e-5, help="distillation learning rate (hf_prune.recover's default)")
    p.add_argument("--ovit-grads", type=int, default=64)
    p.add_argument("--iters1", type=int, default=20, help="timed iterations at batch 1")
    p.add_argument("--iters32", type=int, default=5, help="timed iterations at batch 32")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared machine)")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--no-ovit", action="store_true", help="skip the oViT weight-pruning rows (the slowest)")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script")
    p.add_argument("--only", choices=("structured", "weights"), default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--redo", default="", help="with --resume: rows to compute again for the models and targets "
                                              "of this run, comma-separated names (e.g. '+ distillation')")
    p.add_argument("--out", default="pretrained")
    args = p.parse_args(argv)
    if args.redo and not args.resume:
        p.error("--redo recomputes rows of an existing results file: add --resume")
    if args.quick:
        args.models, args.macs, args.sparsity = "1", "0.8", "0.5"
        args.calib_views, args.eval_views, args.steps, args.batch = 2, 2, 2, 4
        args.iters1, args.iters32, args.ovit_grads = 2, 1, 8
        args.out = args.out if args.out != "pretrained" else "pretrained_quick"
    args_global = args
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = env_info()
    res = Results(RESULTS / f"{args.out}.json", args.resume, info)
    res.data["settings"] = {k: v for k, v in vars(args).items()}
    variants = [int(v) for v in args.models.split(",")]
    targets = {"structured": [float(t) for t in args.macs.split(",")] if args.only != "weights" else [],
               "weights": [float(s) for s in args.sparsity.split(",")] if args.only != "structured" else []}
    if args.redo:
        redo, models = {n.strip() for n in args.redo.split(",")}, {f"efficientnet_lite{v}" for v in variants}
        res.drop(lambda r: r["row"] in redo and r["model"] in models and r["target"] in targets[r["kind"]])
    started = time.perf_counter()
    for variant in variants:
        dense = load_efficientnet_lite(variant)
        data = Data(dense, args.calib_views, args.eval_views)
        dense_logits = logits(dense, data.eval)
        dense_macs = macs(dense, data.example)
        for target in targets["structured"]:
            run_structured(variant, dense, data, dense_logits, dense_macs, target, args, res)
        for sparsity in targets["weights"]:
            run_weights(variant, dense, data, dense_logits, sparsity, args, res)
    res.data["total_seconds"] = round(time.perf_counter() - started, 1)
    # a resumed file holds rows of several runs: keep every run's command
    res.data.setdefault("runs", []).append({"command": info["command"], "date": info["date"],
                                            "seconds": res.data["total_seconds"]})
    res.save()
    md = compose(res.data)
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)


def _f(x, nd=3):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def compose(data: dict) -> str:
    s = data.get("settings", {})
    notes = [
        f"images: calibration and distillation pool = the photos {', '.join(CALIB_PHOTOS)} and skimage's "
        f"{', '.join(SKIMAGE_EXTRA)}, stereo_motorcycle (right view); evaluation (held out) "
        f"{', '.join(EVAL_PHOTOS)}; {s.get('calib_views')} calibration views per pool image and "
        f"{s.get('eval_views')} evaluation views per photo (random resized crops, area 0.25–1, and flips)",
        f"reconstruction: layers={s.get('layers')!r}, ridge 1e-2, calibration views in batches of 24; "
        f"distillation: {s.get('steps')} steps, batch {s.get('batch')}, AdamW lr {s.get('lr')}, cosine, "
        "on fresh random views of the calibration photos only",
        "agreement = fraction of evaluation views where the pruned model's top-1 (top-5) contains the dense "
        "model's top-1; KL = KL(dense || pruned) in nats, mean over views",
        f"total time: {data.get('total_seconds', '?')} s",
    ]
    if len(data.get("runs", [])) > 1:
        notes.append("the rows come from these runs (each `--resume` adds the rows the file did not hold yet): "
                     + "; ".join(f"`{r['command']}` ({r['date']}, {r['seconds']} s)" for r in data["runs"]))
    out = [header_md("Pretrained EfficientNet-Lite: one-shot pruning, reconstruction and distillation",
                     data["env"], notes)]
    for model in sorted({r["model"] for r in data["rows"]}):
        for kind, label in (("structured", "MACs kept"), ("weights", "sparsity")):
            rows = [r for r in data["rows"] if r["model"] == model and r["kind"] == kind]
            if not rows:
                continue
            out.append(f"\n## {model}: {'structured (channels)' if kind == 'structured' else 'weight pruning'}\n")
            table = []
            for r in rows:
                table.append([_f(r["target"], 2), r["row"], _f(r.get("macs"), 3) if kind == "structured" else "",
                              _f(r["top1"]), _f(r["top5"]), _f(r["kl"]), _f(r.get("seconds"), 1)])
            out.append(md_table([f"target ({label})", "setting", "MACs (measured)", "top-1 agr.", "top-5 agr.",
                                 "KL", "time (s)"], table))
        lat = [l for l in data.get("latency", []) if l["model"] == model]
        if lat:
            out.append(f"\n## {model}: latency (CPU, ms, median, interleaved in one process)\n")
            table = []
            for l in lat:
                for k, ms in l["ms"]["1"].items() if "1" in l["ms"] else l["ms"][1].items():
                    b32 = (l["ms"].get("32") or l["ms"].get(32))[k]
                    d1 = (l["ms"].get("1") or l["ms"].get(1))["dense"]
                    d32 = (l["ms"].get("32") or l["ms"].get(32))["dense"]
                    table.append([_f(l["target"], 2), k, _f(l["macs"][k]), _f(ms, 1), _f(d1 / ms, 2), _f(b32, 1),
                                  _f(d32 / b32, 2), l["load"]])
            out.append(md_table(["target", "model", "MACs", "batch 1 ms", "speed-up", "batch 32 ms", "speed-up",
                                 "load (1/5/15)"], table))
    return "\n".join(out)


if __name__ == "__main__":
    main()
