"""Wall time of the pruning engine itself: graph construction + pruning a ViT-Base to ~50% MACs.

hf_prune: ``DependencyGraph(model, x)`` alone, and the whole one-call
``prune(model, example_inputs=x, target_macs=0.5)`` (trace, scores, MACs-targeted allocation,
mask, compaction, check forward). Torch-Pruning: ``MetaPruner(...)`` construction (builds its
DependencyGraph) + ``pruner.step()`` (+ the head-size fix-up of its ViT examples), with a fixed
``pruning_ratio=0.3`` (≈ 50% MACs; Torch-Pruning does not search a MACs target). Each timed on a
fresh deep copy (copy not timed), median of ``--repeats`` runs, all in one process, batch-1 input.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_cost.py
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import os
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (count_params, engine_macs, env_info, first_line, header_md, md_table, median,
                               timm_model, torch_pruning_available, tp_prune, write_results)

MODELS = ["vit_base_patch16_224", "hf:vit-base"]


def build(name: str):
    torch.manual_seed(0)
    if name == "hf:vit-base":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig()).eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}
    return timm_model(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--tp-ratio", type=float, default=0.3)
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else MODELS

    import hf_prune
    from hf_prune.api import prune

    def hf_graph(m, x, rec):
        t0 = time.perf_counter()
        hf_prune.DependencyGraph(m, x)
        rec["total_s"] = time.perf_counter() - t0

    def hf_prune_call(stem):
        def run(m, x, rec):
            t0 = time.perf_counter()
            prune(m, example_inputs=x, target_macs=args.target_macs, prune_stem=stem)
            rec["total_s"] = time.perf_counter() - t0
        return run

    def tp_call(m, x, rec):
        t0 = time.perf_counter()
        tp_prune(m, x, pruning_ratio=args.tp_ratio, timings=rec)
        rec["total_s"] = time.perf_counter() - t0

    methods = [("hf_prune DependencyGraph only", hf_graph, False),
               ("hf_prune prune(target_macs=0.5)", hf_prune_call(False), True),
               ("hf_prune prune(target_macs=0.5, prune_stem=True)", hf_prune_call(True), True)]
    if torch_pruning_available():
        methods.append((f"Torch-Pruning MetaPruner + step (ratio {args.tp_ratio})", tp_call, True))

    info = env_info()
    rows = []
    for name in models:
        dense, x = build(name)
        dense_macs = engine_macs(dense, x)
        dense_params = count_params(dense)
        # one untimed warm-up of each engine (first-call costs: lazy imports, op registries)
        for label, fn, _ in methods:
            try:
                fn(copy.deepcopy(dense), x, {})
            except Exception:  # noqa: BLE001 - reported below
                pass
        for label, fn, prunes in methods:
            row = {"model": name, "method": label, "runs": []}
            rows.append(row)
            try:
                for _ in range(args.repeats):
                    m = copy.deepcopy(dense)
                    gc.collect()
                    rec: dict = {}
                    fn(m, x, rec)
                    row["runs"].append(rec)
                row["median_s"] = median([r["total_s"] for r in row["runs"]])
                for part in ("graph_s", "step_s"):
                    if all(part in r for r in row["runs"]):
                        row[f"median_{part}"] = median([r[part] for r in row["runs"]])
                if prunes:
                    row["macs_ratio"] = engine_macs(m, x) / dense_macs
                    row["params_ratio"] = count_params(m) / dense_params
                print(f"{name} | {label}: {row['median_s']:.2f} s "
                      + (f"(MACs {row['macs_ratio']:.3f})" if prunes else ""), flush=True)
            except Exception as exc:  # noqa: BLE001
                row["error"] = first_line(exc)
                row["traceback"] = traceback.format_exc(limit=-6).replace(os.getcwd() + os.sep, "")
                print(f"{name} | {label}: FAILED {row['error']}", flush=True)
        del dense
        gc.collect()

    for name in models:
        hf = next((r for r in rows if r["model"] == name and r["method"].startswith("hf_prune prune(")
                   and "median_s" in r), None)
        tp = next((r for r in rows if r["model"] == name and r["method"].startswith("Torch-Pruning")
                   and "median_s" in r), None)
        if hf and tp:
            hf["vs_torch_pruning"] = hf["median_s"] / tp["median_s"]

    notes = [f"median of {args.repeats} runs per method after one untimed warm-up, each on a fresh deep copy "
             "(copy not timed); batch-1 224×224 input; random weights",
             "hf_prune `prune(...)` is the whole one-call path: trace, importance, MACs-targeted allocation, "
             "mask, compaction and a check forward; Torch-Pruning uses a fixed ratio (no MACs search)",
             "MACs ratio counted by `hf_prune.DependencyGraph(model, x).macs()`"]
    md = [header_md("Engine cost: graph construction + pruning ViT-Base to ~50% MACs", info, notes), "\n"]
    table = []
    for r in rows:
        table.append([f"`{r['model']}`", r["method"], f"{r['median_s']:.2f}" if "median_s" in r else "–",
                      ", ".join(f"{x['total_s']:.2f}" for x in r["runs"]),
                      f"{r['median_graph_s']:.2f} + {r['median_step_s']:.2f}" if "median_graph_s" in r else "",
                      f"{r['macs_ratio']:.3f}" if "macs_ratio" in r else "–",
                      f"{r['params_ratio']:.3f}" if "params_ratio" in r else "–",
                      r.get("error", "")])
    md.append(md_table(["model", "method", "median s", "runs s", "graph + step s", "MACs ratio",
                        "params ratio", "error"], table))
    ratios = [(r["model"], r["vs_torch_pruning"]) for r in rows if "vs_torch_pruning" in r]
    if ratios:
        md.append("\nhf_prune `prune(target_macs=0.5)` time / Torch-Pruning time: "
                  + ", ".join(f"`{m}` {v:.2f}×" for m, v in ratios) + "\n")
    text = "".join(md)
    paths = write_results("engine_cost", text, {"info": info, "args": vars(args), "rows": rows})
    print()
    print(text)
    print("written:", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
