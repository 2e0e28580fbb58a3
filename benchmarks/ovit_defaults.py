"""oViT defaults: what the block size B and the number of gradients m buy, and what they cost.

Parts (``--parts``, default both; results kept in ``benchmarks/results/ovit_defaults.json``):

* ``digits``: the small CNN of ``benchmarks/weight_pruning.py`` (4 conv + 2 linear, BatchNorm) trained
  on 4,000 real MNIST digits, pruned one-shot with oViT (global OBS threshold) at 70% and 90% for each
  ``(B, m)`` of ``--configs``; the same 4,000 training images are split into ``m`` mini-batches for the
  ``m`` gradients, so every setting sees the same data. Held-out accuracy (1,000 digits), agreement
  with the dense model, wall time, Fisher bytes.
* ``memory``: the Fisher information each setting holds for the prunable layers of larger models
  (timm shapes, no weights needed): total bytes, which representation ``fisher="auto"`` picks, and how
  many layer groups / rounds of gradient passes the default budget (``max_fisher_mb="auto"``) implies.
  Pure arithmetic from :func:`hf_prune.methods.ovit.obs.fisher_bytes`, exact for the code measured.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/ovit_defaults.py``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, header_md, md_table, run_parts  # noqa: E402
from hf_prune.methods.ovit import obs  # noqa: E402
from hf_prune.methods.ovit.recipe import calibration_batches  # noqa: E402
from hf_prune.sparse.masks import WeightMasks, prunable_layers  # noqa: E402

PARTS = ("digits", "memory")
MEMORY_MODELS = ("deit_small_patch16_224", "vit_base_patch16_224", "resnet50", "efficientnet_lite1")


def _config(text: str) -> tuple[int, int]:
    b, m = text.split(",")
    return int(b), int(m)


def part_digits(args) -> dict:
    from benchmarks.weight_pruning import SmallCNN, evaluate, mnist_splits, train

    train_split, val, _ = mnist_splits()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = train(SmallCNN(), train_split, epochs=args.epochs, lr=3e-3)
    train_s = time.perf_counter() - t0
    dense_acc, _, dense_pred = evaluate(dense, val)
    print(f"[digits] dense acc {dense_acc:.4f} ({train_s:.0f}s)", flush=True)
    rows = []
    for block, m in args.configs:
        calib = calibration_batches(train_split, m, max(1, len(train_split) // m), seed=0)
        for sparsity in args.sparsities:
            model = copy.deepcopy(dense)
            info: dict = {}
            t0 = time.perf_counter()
            obs.ovit_prune(model, sparsity, calib, masks=WeightMasks.for_model(model), block_size=block, num_grads=m,
                           num_threads=args.threads, info=info)
            sec = time.perf_counter() - t0
            acc, agree, _ = evaluate(model, val, dense_pred)
            rows.append({"block_size": block, "num_grads": info["num_grads"], "batch": calib_batch(calib),
                         "sparsity": sparsity, "acc": acc, "agree": agree, "seconds": sec,
                         "grad_seconds": info["grad_seconds"], "sweep_seconds": info["sweep_seconds"],
                         "apply_seconds": info["apply_seconds"], "fisher": info["fisher"],
                         "fisher_bytes": info["fisher_bytes"], "predicted_loss": info["predicted_loss"]})
            print(f"[digits] B={block} m={m} {sparsity:.2f}: acc {acc:.4f} agree {agree:.4f} ({sec:.1f}s)", flush=True)
    return {"dense_acc": dense_acc, "train_seconds": train_s, "epochs": args.epochs,
            "prunable_weights": sum(dict(dense.named_modules())[n].weight.numel() for n in prunable_layers(dense)),
            "rows": rows}


def calib_batch(calib) -> int:
    return len(calib.indices[0])


def part_memory(args) -> dict:
    import timm

    out = {}
    for name in MEMORY_MODELS:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        sizes = {n: mod.weight.numel() for n, mod in prunable_layers(model).items()}
        rec = {"prunable_weights": sum(sizes.values()), "layers": len(sizes), "configs": []}
        for block, m in args.configs + [(192, 4096)]:
            mode = obs.choose_fisher("auto", m, block, torch.float64, torch.float32)
            per = {n: obs.fisher_bytes(d, fisher=mode, block_size=block, num_grads=m, dtype=torch.float64,
                                       grad_dtype=torch.float32) for n, d in sizes.items()}
            budget = obs.auto_fisher_mb(per)
            groups = len(obs.plan_groups(per, budget))
            rec["configs"].append({"block_size": block, "num_grads": m, "fisher": mode,
                                   "fisher_gib": sum(per.values()) / 2 ** 30,
                                   "largest_layer_gib": max(per.values()) / 2 ** 30,
                                   "auto_budget_mb": budget, "groups": groups,
                                   "gradient_passes": m * (2 * groups if groups > 1 else 1)})
        out[name] = rec
    return out


def compose(cache: dict) -> str:
    runs = cache.get("runs", {})
    info = next(iter(runs.values()))["env"] if runs else env_info()
    md = header_md("oViT defaults: block size and number of gradients", info,
                   ["each part ran in its own process; its command, date and load are listed with it",
                    f"default budget `max_fisher_mb='auto'`: {obs.DEFAULT_MAX_FISHER_MB} MiB, or the largest "
                    "layer's Fisher if larger; with several groups the global threshold needs each group's Fisher "
                    "twice (2 rounds of m gradient passes per group)"])
    if "digits" in runs:
        r = runs["digits"]
        d = r["result"]
        md += (f"\n## One-shot oViT on real MNIST digits (small CNN, dense accuracy {d['dense_acc']:.4f}, "
               f"{d['prunable_weights']:,} prunable weights)\n\n- `{r['env']['command']}` — {r['env']['date']}, "
               f"load at start {r['env']['loadavg_start']}, torch threads {r['env']['torch_threads']}\n"
               "- the 4,000 training images split into m mini-batches (m gradients); float64 Fisher, damping 1e-8, "
               "global OBS threshold, no fine-tuning, no BatchNorm re-calibration\n\n")
        md += md_table(["B", "m", "images / gradient", "sparsity", "accuracy", "agreement", "s (gradients / sweep / "
                        "replay)", "Fisher MiB"],
                       [[x["block_size"], x["num_grads"], x["batch"], x["sparsity"], f"{x['acc']:.4f}",
                         f"{x['agree']:.4f}", f"{x['seconds']:.1f} ({x['grad_seconds']:.1f} / {x['sweep_seconds']:.1f}"
                         f" / {x['apply_seconds']:.1f})", f"{x['fisher_bytes'] / 2 ** 20:.1f}"] for x in d["rows"]])
    if "memory" in runs:
        r = runs["memory"]
        md += (f"\n## Fisher memory on larger models (arithmetic, exact for this code)\n\n- `{r['env']['command']}` — "
               f"{r['env']['date']}\n\n")
        rows = []
        for name, rec in r["result"].items():
            for c in rec["configs"]:
                rows.append([f"`{name}`", f"{rec['prunable_weights']:,}", c["block_size"], c["num_grads"], c["fisher"],
                             f"{c['fisher_gib']:.1f}", f"{c['largest_layer_gib']:.2f}",
                             "none (one group)" if c["auto_budget_mb"] is None else f"{c['auto_budget_mb']:.0f}",
                             c["groups"], c["gradient_passes"]])
        md += md_table(["model", "prunable weights", "B", "m", "held as", "Fisher GiB", "largest layer GiB",
                        "auto budget MiB", "groups", "gradient passes"], rows)
    return md


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.7, 0.9])
    p.add_argument("--configs", nargs="+", type=_config, default=[(64, 64), (128, 256), (192, 1024)],
                   help="B,m pairs")
    p.add_argument("--cache", help="results of earlier parts, re-used (default: results/ovit_defaults.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_parts("ovit_defaults", {"digits": part_digits, "memory": part_memory}, args, compose, cache=args.cache)

if __name__ == "__main__":
    main()
