"""UPDP speed: ConvNeXt-T and DeiT-S with 3, 6 and 9 blocks merged vs dense, measured in one process.

Models: timm ``convnext_tiny`` (18 candidate blocks) and ``deit_small_patch16_224`` (12), random weights
(``pretrained=False``) with small noise on every parameter and BN statistic (``benchmarks.common.perturb_``)
so that merges are non-trivial. Variants per model:

* ``dense``;
* ``merged-k`` (k = 3, 6, 9): ``prune_depth(model, num_blocks=k, example_inputs=x)`` — the library's
  one-shot path: the ``k`` blocks whose annealing changes the output least on a batch of 2 random images
  (on random weights this choice is arbitrary but deterministic), annealed to lambda = 1 and merged
  exactly (ConvNeXt: dw7x7 -> one 1x1 C->C, + x; DeiT: attention dropped, MLP -> one Linear D->D);
* ``removed-k`` (``--removed``, default k = 9): the same blocks replaced by identity — what the published anchor
  measures (ConvNeXt-T depths 2-2-3-2); it shows what the merged blocks still cost.

CPU: fp32, eval, ``torch.inference_mode``, batch 1 and batch 32, variants timed round-robin in the same
process (``benchmarks.common.time_interleaved``), median per variant. GPU (only when CUDA is available):
batch 256, bf16 autocast, channels_last for ConvNeXt, as ``benchmarks/speed.py``. MACs:
``hf_prune.metrics.profiling.count_macs`` at batch 1 (counts CPU fused attention). efficiency = speed-up x MACs
ratio (1.0 = the speed-up is proportional to the MACs removed).

    PYTHONPATH=. .venv/bin/python benchmarks/updp_speed.py             # ~10 min on a loaded 2-core CPU
    PYTHONPATH=. .venv/bin/python benchmarks/updp_speed.py --quick
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import env_info, header_md, md_table, perturb_, rel_err, run_logits, timm_model, write_results
from benchmarks.speed import time_variants, with_batch

MODELS = ["convnext_tiny", "deit_small_patch16_224"]
ANCHOR = ("ConvNeXt-T with blocks removed to depths 2-2-3-2 (9 of 18 blocks), 52% of the MACs: 1.59x the dense "
          "throughput on an H100 (a reference measurement of the removed-blocks model, not taken by this project)")


def make_variants(name: str, ks: list[int], removed_ks: list[int], log) -> tuple[dict, list[dict], torch.Tensor]:
    from hf_prune.methods.updp.depth import set_module, find_blocks, prune_depth
    from hf_prune.metrics.profiling import count_macs

    torch.manual_seed(0)
    dense, x = timm_model(name)
    perturb_(dense)
    dense.eval()
    dense_macs = count_macs(dense, x)
    n_blocks = len(find_blocks(dense))
    models = {"dense": dense}
    rows = [{"model": name, "variant": "dense", "blocks": [], "macs": dense_macs, "macs_ratio": 1.0,
             "candidates": n_blocks}]
    calib = with_batch(x, 2)
    for k in ks:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        _, record = prune_depth(m, num_blocks=k, example_inputs=calib)
        secs = time.perf_counter() - t0
        blocks = [e["path"] for e in record["merged_blocks"]]
        macs = count_macs(m, x)
        models[f"merged-{k}"] = m.eval()
        rows.append({"model": name, "variant": f"merged-{k}", "blocks": blocks, "macs": macs,
                     "macs_ratio": macs / dense_macs, "prune_s": secs, "candidates": n_blocks})
        log(f"  merged-{k}: MACs {macs / dense_macs:.3f} ({secs:.0f} s) {blocks}")
        if k in removed_ks:
            r = copy.deepcopy(dense)
            for p in blocks:
                set_module(r, p, nn.Identity())
            macs_r = count_macs(r, x)
            models[f"removed-{k}"] = r.eval()
            rows.append({"model": name, "variant": f"removed-{k}", "blocks": blocks, "macs": macs_r,
                         "macs_ratio": macs_r / dense_macs, "candidates": n_blocks})
    y = run_logits(dense, x)
    for row in rows:  # how far the one-shot merged model is from dense (untrained; for the record only)
        row["output_rel_change"] = rel_err(y, run_logits(models[row["variant"]], x))
    return models, rows, x


def bench_model(name: str, args, log) -> list[dict]:
    models, rows, x = make_variants(name, args.ks, args.removed, log)
    by_variant = {r["variant"]: r for r in rows}
    time_variants(name, models, by_variant, x, args, log)
    return rows


def render(rows: list[dict], info: dict, args) -> str:
    notes = [
        "models: timm `convnext_tiny` (18 candidate blocks) and `deit_small_patch16_224` (12), `pretrained=False`, "
        "noise on every parameter / BN statistic (`perturb_`), 224x224 inputs",
        "merged-k: `prune_depth(model, num_blocks=k, example_inputs=x)` (blocks chosen by the output-change proxy on "
        "2 random images: arbitrary on random weights, listed in the JSON), exact merge"
        + ("; removed-k: the same blocks replaced by identity (what the anchor measures)" if args.removed else ""),
        "MACs: `hf_prune.metrics.profiling.count_macs` at batch 1",
        f"CPU: fp32, eval, `torch.inference_mode`, {info['torch_threads']} torch thread(s), median of {args.iters} "
        f"passes at batch 1 (after {args.warmup} warm-up) and of {args.iters32} at batch 32 (after {args.warmup32}); "
        "variants timed round-robin in one process",
        "speed-up = dense latency / variant latency (same process, same run); efficiency = speed-up x MACs ratio",
    ]
    if torch.cuda.is_available() and args.gpu_iters > 0:
        notes.append(f"GPU: batch {args.gpu_batch}, bf16 autocast, channels_last for ConvNeXt, median of "
                     f"{args.gpu_iters} after {args.gpu_warmup} warm-up")
    else:
        notes.append("GPU: not available on this machine, not measured (the code path runs when CUDA is available)")
    notes.append(f"anchor for comparison: {ANCHOR}")
    out = [header_md("UPDP speed: blocks merged vs dense", info, notes), "\n"]
    settings = [("cpu_b1", "CPU b1"), ("cpu_b32", "CPU b32"), ("gpu", "GPU b256 bf16")]
    settings = [s for s in settings if any(r.get(f"{s[0]}_ms") for r in rows)]
    cols = ["model", "variant", "MACs ratio"]
    for _, label in settings:
        cols += [f"{label} ms", f"{label} speed-up", f"{label} efficiency"]
    table = []
    for r in rows:
        line = [f"`{r['model']}`", r["variant"], f"{r['macs_ratio']:.3f}"]
        for key, _ in settings:
            ms = r.get(f"{key}_ms")
            line += [_f(ms, 1 if (ms or 0) >= 10 else 2), _f(r.get(f"{key}_speedup"), 2, "x"),
                     _f(r.get(f"{key}_efficiency"), 2)]
        table.append(line)
    out.append(md_table(cols, table))
    return "".join(out)


def _f(v, digits, suffix=""):
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ks", default="3,6,9", help="numbers of blocks merged")
    ap.add_argument("--removed", default="9", help="k values for which the same blocks are also timed removed "
                    "(identity), comma-separated; '' for none")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters32", type=int, default=5)
    ap.add_argument("--warmup32", type=int, default=1)
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--gpu-iters", type=int, default=30)
    ap.add_argument("--gpu-warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    args.removed = [int(k) for k in args.removed.split(",") if k.strip()]
    if args.quick:
        args.iters, args.warmup, args.iters32, args.warmup32 = 3, 1, 1, 0
        args.gpu_iters, args.gpu_warmup = 5, 2
    torch.set_num_threads(args.threads)
    info = env_info()
    t_all = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        rows += bench_model(name, args, lambda s: print(s, flush=True))
        gc.collect()
    info["total_s"] = time.perf_counter() - t_all
    md = render(rows, info, args) + f"\nTotal wall time: {info['total_s'] / 60:.1f} min\n"
    gpu = torch.cuda.is_available() and args.gpu_iters > 0
    stem = args.out or ("updp_speed_gpu" if gpu else "updp_speed") + ("_quick" if args.quick else "")
    paths = write_results(stem, md, {"info": info, "args": vars(args), "rows": rows, "anchor": ANCHOR})
    print(md)
    print("written:", *paths)


if __name__ == "__main__":
    main()
