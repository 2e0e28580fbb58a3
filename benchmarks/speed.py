"""Dense vs pruned (~50% MACs) latency, in one process: does halving MACs make the model faster?

Models: timm convnext_tiny, resnet50, deit_small_patch16_224 (random weights) and transformers
ViT-Base (``ViTForImageClassification(ViTConfig())``, ViT-B/16 224). Variants per model:

* ``dense``
* ``hf_prune`` — ``prune(model, example_inputs=x, target_macs=0.5)`` (defaults: l2, global, round_to=8)
* ``hf_prune_stem`` — the same with ``prune_stem=True`` (also prunes the stem / embedding width)
* ``hf_prune_r16`` — the same as ``hf_prune`` with ``round_to=16`` (widths that fill AVX-512 fp32 vectors)
* ``torch_pruning`` — Torch-Pruning's default output (``MetaPruner`` + ``GroupMagnitudeImportance(p=2)``,
  uniform ``pruning_ratio=0.3`` ≈ 50% MACs, classifier ignored, ``num_heads`` mapping for ViTs as in
  Torch-Pruning's own ViT examples, ``round_to=None``), when torch_pruning is importable
* ``torch_pruning_r8`` — the same with ``round_to=8`` (only with ``--variants``)
* ``hf_prune_lat`` — ``target_latency=0.5`` instead of ``target_macs``: half the dense latency as
  measured on this CPU for the very setting it is timed in (batch 1 or 32, NCHW or channels_last), so
  one model is pruned per setting (``benchmarks.common.latency_prune``: the engine's latency model,
  knapsack allocation, verification against the dense model and one correction)
* ``hf_prune_lat_m`` — the same with ``round_to="measured"`` (widths chosen among nearby multiples of
  8/16/32/64 by timing them)

CPU: batch 1 and batch 32, fp32, eval + inference_mode; variants timed round-robin (each round runs
every variant once) and the median per variant is reported. CNNs are timed twice on CPU: in the
default NCHW layout and in channels_last (model and input), the layout PyTorch recommends for CNN
inference on CPU; both layouts are reported. GPU (only when CUDA is available): batch 256, bf16
autocast, channels_last for CNNs, CUDA synchronised around each pass.

efficiency = speed-up × (pruned MACs / dense MACs): 1.0 means the speed-up is fully proportional to
the MACs removed; the goal is >= 0.8.

    PYTHONPATH=. .venv/bin/python benchmarks/speed.py
    PYTHONPATH=. .venv/bin/python benchmarks/speed.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/speed.py --models resnet50 --iters 30 --iters32 5
    # latency as the target only (cheap to rerun: latency tables are cached on disk)
    PYTHONPATH=. .venv/bin/python benchmarks/speed.py --variants dense,hf_prune,hf_prune_lat,hf_prune_lat_m \
        --settings cpu_b1,cpu_b1_cl --threads 1 --clock thread --out latency_cpu
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
from torch import nn

from benchmarks.common import (count_params, engine_macs, env_info, first_line, header_md, latency_prune, md_table,
                               median, perturb_, run_logits, time_interleaved, timm_model, torch_pruning_available,
                               tp_prune, write_results)

MODELS = ["convnext_tiny", "resnet50", "deit_small_patch16_224", "hf:vit-base"]
CNNS = {"convnext_tiny", "resnet50"}
LATENCY_VARIANTS = {"hf_prune_lat": 8, "hf_prune_lat_m": "measured"}  # variant -> round_to
ALL_VARIANTS = ["dense", "hf_prune", "hf_prune_stem", "hf_prune_r16", "torch_pruning", "torch_pruning_r8",
                *LATENCY_VARIANTS]
DEFAULT_VARIANTS = ["dense", "hf_prune", "hf_prune_stem", "hf_prune_r16", "torch_pruning", *LATENCY_VARIANTS]


def build(name: str):
    torch.manual_seed(0)
    if name == "hf:vit-base":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig()).eval()  # default config = ViT-B/16, 224
        return model, {"pixel_values": torch.randn(1, 3, 224, 224)}
    return timm_model(name)


def with_batch(x, batch: int, device="cpu", channels_last=False):
    def f(t):
        t = t.expand(batch, *t.shape[1:]).contiguous().to(device)
        t = t + 0.01 * torch.randn_like(t)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    torch.manual_seed(1)
    return {k: f(v) for k, v in x.items()} if isinstance(x, dict) else f(x)


def aligned_fraction(model: nn.Module, multiple: int = 8) -> float:
    """Fraction of Conv/Linear layers whose in and out widths are multiples of ``multiple``
    (grouped convs: per-group in width; the classifier's class count is ignored)."""
    n = ok = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            dims = [m.in_features] + ([m.out_features] if m.out_features not in (2, 1000) else [])
        elif isinstance(m, nn.Conv2d):
            dims = [m.out_channels] + ([m.in_channels // m.groups] if m.groups == 1 else [])
            if m.in_channels == 3:
                dims = [m.out_channels]
        else:
            continue
        n += 1
        ok += all(d % multiple == 0 for d in dims)
    return ok / n if n else float("nan")


def make_variant(kind: str, dense: nn.Module, x, target_macs: float, tp_ratio: float):
    from hf_prune.api import prune

    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if kind == "hf_prune":
        prune(model, example_inputs=x, target_macs=target_macs)
    elif kind == "hf_prune_stem":
        prune(model, example_inputs=x, target_macs=target_macs, prune_stem=True)
    elif kind == "hf_prune_r16":
        prune(model, example_inputs=x, target_macs=target_macs, round_to=16)
    elif kind == "torch_pruning":
        tp_prune(model, x, pruning_ratio=tp_ratio, round_to=None)
    elif kind == "torch_pruning_r8":
        tp_prune(model, x, pruning_ratio=tp_ratio, round_to=8)
    else:
        raise ValueError(kind)
    return model.eval(), time.perf_counter() - t0


def bench_model(name: str, variants: list[str], args, log) -> list[dict]:
    dense, x = build(name)
    perturb_(dense)
    rows: dict[str, dict] = {}
    models: dict[str, nn.Module] = {"dense": dense}
    y_dense = run_logits(dense, x)
    dense_macs, dense_params = engine_macs(dense, x), count_params(dense)
    rows["dense"] = {"model": name, "variant": "dense", "macs": dense_macs, "params": dense_params,
                     "macs_ratio": 1.0, "params_ratio": 1.0, "aligned8": aligned_fraction(dense)}
    for kind in variants:
        if kind == "dense":
            continue
        row = {"model": name, "variant": kind}
        rows[kind] = row
        if kind in LATENCY_VARIANTS:  # pruned per timing setting, in time_variants
            continue
        try:
            m, secs = make_variant(kind, dense, x, args.target_macs, args.tp_ratio)
            y = run_logits(m, x)
            if y.shape != y_dense.shape:
                raise RuntimeError(f"output shape {tuple(y.shape)} != dense {tuple(y_dense.shape)}")
            row.update(prune_s=secs, macs=engine_macs(m, x), params=count_params(m), aligned8=aligned_fraction(m))
            row["macs_ratio"] = row["macs"] / dense_macs
            row["params_ratio"] = row["params"] / dense_params
            models[kind] = m
            log(f"  {kind}: MACs {row['macs_ratio']:.3f} params {row['params_ratio']:.3f} "
                f"aligned8 {row['aligned8']:.2f} ({secs:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - report and keep going
            row["error"] = first_line(exc)
            row["traceback"] = traceback.format_exc(limit=-6).replace(os.getcwd() + os.sep, "")
            log(f"  {kind}: FAILED {row['error']}")

    time_variants(name, models, rows, x, args, log, channels_last=name in CNNS and not args.no_channels_last,
                  latency_variants=[v for v in variants if v in LATENCY_VARIANTS])
    return [rows[k] for k in variants]


CPU_SETTINGS = ["cpu_b1", "cpu_b32", "cpu_b1_cl", "cpu_b32_cl"]


def make_latency_variant(kind: str, dense: nn.Module, x, batch: int, channels_last: bool, target: float) -> tuple:
    """``dense`` pruned to ``target`` of its latency measured on this CPU at ``batch`` in the given layout."""
    model = copy.deepcopy(dense)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    inputs = with_batch(x, 1, channels_last=channels_last)
    t0 = time.perf_counter()
    report = latency_prune(model, inputs, target, batch_size=batch, round_to=LATENCY_VARIANTS[kind])
    return model.eval(), report, time.perf_counter() - t0


def _plan_summary(report: dict) -> dict:
    chosen = report["attempts"][report.get("chosen", 0)]
    return {"predicted": chosen.get("predicted_ratio"), "verified": report["measured"]["latency_ratio"],
            "corrected": report["corrected"], "within_tolerance": report["within_tolerance"],
            "attempts": [{k: a.get(k) for k in ("budget", "predicted_ratio")} | {
                "measured": (a.get("measured") or {}).get("latency_ratio")} for a in report["attempts"]],
            "build_s": report["build_s"], "points_measured": report["points_measured"],
            "residual_share": report["residual_share"], "load": report["measured"].get("load")}


def time_variants(name: str, models: dict, rows: dict, x, args, log, channels_last: bool = False,
                  latency_variants=()) -> None:
    """Time every model of ``models`` round-robin (CPU b1 / b32, GPU when present) and write latency,
    speed-up vs ``rows["dense"]`` and efficiency (speed-up x MACs ratio) into ``rows[variant]``.
    ``channels_last`` adds CPU timings with models and inputs in that layout (keys ``*_cl``).
    ``latency_variants`` (of :data:`LATENCY_VARIANTS`) are pruned afresh for each CPU setting, to the
    latency measured in that setting, and timed in it beside the others."""
    settings = [("cpu_b1", 1, args.warmup, args.iters, False), ("cpu_b32", 32, args.warmup32, args.iters32, False)]
    if channels_last:
        settings += [("cpu_b1_cl", 1, args.warmup, args.iters, True),
                     ("cpu_b32_cl", 32, args.warmup32, args.iters32, True)]
    wanted = getattr(args, "settings", None)
    settings = [s for s in settings if not wanted or s[0] in wanted]
    dense_macs = rows["dense"].get("macs")
    for key, batch, warmup, iters, cl in settings:
        if iters <= 0:
            continue
        xb = with_batch(x, batch, channels_last=cl)
        timed = {k: copy.deepcopy(m).to(memory_format=torch.channels_last) if cl else m for k, m in models.items()}
        for kind in latency_variants:
            try:
                m, report, secs = make_latency_variant(kind, models["dense"], x, batch, cl, args.target_latency)
            except Exception as exc:  # noqa: BLE001 - report and keep going
                rows[kind][f"{key}_error"] = first_line(exc)
                log(f"  {kind} {key}: FAILED {first_line(exc)}")
                continue
            timed[kind] = m
            plan = _plan_summary(report)
            rows[kind].update({f"{key}_prune_s": secs, f"{key}_plan": plan,
                               f"{key}_macs_ratio": engine_macs(m, with_batch(x, 1)) / dense_macs})
            log(f"  {kind} {key}: MACs {rows[kind][f'{key}_macs_ratio']:.3f}, plan predicted "
                f"{plan['predicted']:.3f} verified {plan['verified']:.3f} (corrected: {plan['corrected']}, {secs:.0f} s)")
        t0 = time.perf_counter()
        clock = time.thread_time if getattr(args, "clock", "wall") == "thread" else time.perf_counter
        times = time_interleaved({k: (m, xb) for k, m in timed.items()}, warmup=warmup, iters=iters, clock=clock)
        del timed
        log(f"  {key}: {time.perf_counter() - t0:.0f} s")
        for k, ts in times.items():
            rows[k][f"{key}_ms"] = median(ts)
            rows[k][f"{key}_times"] = ts
        del xb
        gc.collect()

    if torch.cuda.is_available() and args.gpu_iters > 0:
        cl = name in CNNS
        gpu_models = {}
        for k, m in models.items():
            g = copy.deepcopy(m).cuda()
            gpu_models[k] = g.to(memory_format=torch.channels_last) if cl else g
        xb = with_batch(x, args.gpu_batch, device="cuda", channels_last=cl)
        times = time_interleaved({k: (m, xb) for k, m in gpu_models.items()}, warmup=args.gpu_warmup,
                                 iters=args.gpu_iters, device="cuda", autocast_dtype=torch.bfloat16)
        for k, ts in times.items():
            rows[k]["gpu_ms"] = median(ts)
            rows[k]["gpu_img_s"] = args.gpu_batch / (median(ts) / 1000.0)
            rows[k]["gpu_times"] = ts
        del gpu_models, xb
        torch.cuda.empty_cache()

    dense = rows["dense"]
    for r in rows.values():
        for key in CPU_SETTINGS + ["gpu"]:
            if r.get(f"{key}_ms") and dense.get(f"{key}_ms"):
                r[f"{key}_speedup"] = dense[f"{key}_ms"] / r[f"{key}_ms"]
                macs = r.get(f"{key}_macs_ratio", r.get("macs_ratio"))
                if macs is not None:
                    r[f"{key}_efficiency"] = r[f"{key}_speedup"] * macs


def render(rows: list[dict], info: dict, args) -> str:
    notes = [
        "models: random weights (timm `pretrained=False`; transformers `ViTForImageClassification(ViTConfig())` "
        "= ViT-B/16 224, 2 labels) with small noise on every parameter/BN statistic; 224×224 inputs",
        f"hf_prune: `prune(model, example_inputs=x, target_macs={args.target_macs})` (l2, global, round_to=8); "
        "hf_prune_stem adds `prune_stem=True`; hf_prune_r16 uses `round_to=16`",
        f"torch_pruning: `MetaPruner(..., importance=GroupMagnitudeImportance(p=2), pruning_ratio={args.tp_ratio}, "
        "ignored_layers=[classifier], num_heads=..., prune_head_dims=True, prune_num_heads=False)`, default "
        "round_to=None (Torch-Pruning's default output); note it also prunes the embedding/stem width",
        "MACs: `hf_prune.DependencyGraph(model, x).macs()` at batch 1 (counts attention, which torch's "
        "FlopCounterMode misses on CPU)",
        f"CPU clock: {'CPU time of the calling thread (one intra-op thread; not inflated by load)' if getattr(args, 'clock', 'wall') == 'thread' else 'wall time'}",
        f"CPU latency: fp32, eval, `torch.inference_mode`, median of {args.iters} passes at batch 1 "
        f"(after {args.warmup} warm-up) and of {args.iters32} at batch 32 (after {args.warmup32}); "
        "variants timed round-robin in the same process; CNNs (convnext_tiny, resnet50) are timed in NCHW "
        "(first table) and again in channels_last (second table, model and input converted, as PyTorch "
        "recommends for CNN inference on CPU)",
        "speed-up = dense latency / variant latency (same process, same run); "
        "efficiency = speed-up × MACs ratio (1.0 = proportional to MACs; goal ≥ 0.8)",
        "aligned8: fraction of Conv/Linear layers whose widths are multiples of 8",
    ]
    if any(r["variant"] in LATENCY_VARIANTS for r in rows):
        notes.append(f"hf_prune_lat / hf_prune_lat_m: `target_latency={getattr(args, 'target_latency', 0.5)}` of the "
                     "dense latency measured on this CPU in the setting the row is timed in (one pruned model per "
                     "setting; hf_prune_lat_m with `round_to=\"measured\"`); their MACs ratio differs per setting "
                     "(latency table below); 'plan: verified' is the plan's own interleaved measurement, 'benchmark "
                     "latency ratio' this run's round-robin timing")
    if torch.cuda.is_available() and args.gpu_iters > 0:
        notes.append(f"GPU: batch {args.gpu_batch}, bf16 autocast, channels_last for CNNs, median of "
                     f"{args.gpu_iters} after {args.gpu_warmup} warm-up")
    else:
        notes.append("GPU: not available on this machine, not measured")
    out = [header_md("Speed: dense vs ~50% MACs pruned", info, notes), "\n"]
    out.append(_table(rows, [("cpu_b1", "CPU batch 1"), ("cpu_b32", "CPU batch 32"), ("gpu", "GPU batch 256 bf16")]))
    cl_rows = [r for r in rows if r.get("cpu_b1_cl_ms") or r.get("cpu_b32_cl_ms")]
    if cl_rows:
        out.append("\n### CNNs on CPU in channels_last (model and input)\n\n")
        out.append(_table(cl_rows, [("cpu_b1_cl", "CPU batch 1"), ("cpu_b32_cl", "CPU batch 32")]))
    if any(r["variant"] in LATENCY_VARIANTS for r in rows):
        out.append(_latency_table(rows, getattr(args, "target_latency", 0.5)))
    return "".join(out)


def _latency_table(rows: list[dict], target: float) -> str:
    """One line per latency-targeted model: what the plan predicted and verified, and what the
    round-robin timing of this benchmark measured (latency ratio = 1 / speed-up)."""
    cols = ["model", "setting", "variant", "MACs ratio", "plan: predicted", "plan: verified", "corrected",
            "benchmark latency ratio", f"within 10 % of {target}", "prune s", "error"]
    table = []
    for r in rows:
        if r["variant"] not in LATENCY_VARIANTS:
            continue
        for key in CPU_SETTINGS:
            plan, speedup = r.get(f"{key}_plan"), r.get(f"{key}_speedup")
            if not plan and not r.get(f"{key}_error"):
                continue
            ratio = 1 / speedup if speedup else None
            table.append([f"`{r['model']}`", key, r["variant"], _f(r.get(f"{key}_macs_ratio"), 3),
                          _f((plan or {}).get("predicted"), 3), _f((plan or {}).get("verified"), 3),
                          (plan or {}).get("corrected", "–"), _f(ratio, 3),
                          "–" if ratio is None else ("yes" if abs(ratio / target - 1) <= 0.1 else "no"),
                          _f(r.get(f"{key}_prune_s"), 0), r.get(f"{key}_error", "")])
    return f"\n### Latency as the target (`target_latency={target}`, measured per setting)\n\n" + md_table(cols, table)


def _table(rows: list[dict], settings: list[tuple]) -> str:
    settings = [s for s in settings if any(r.get(f"{s[0]}_ms") for r in rows)]
    cols = ["model", "variant", "MACs ratio", "params ratio", "aligned8"]
    for key, label in settings:
        cols += [f"{label} ms", f"{label} speed-up", f"{label} efficiency"]
    cols.append("error")
    table = []
    for r in rows:
        line = [f"`{r['model']}`", r["variant"], _f(r.get("macs_ratio"), 3), _f(r.get("params_ratio"), 3),
                _f(r.get("aligned8"), 2)]
        for key, _ in settings:
            line += [_f(r.get(f"{key}_ms"), 1 if (r.get(f"{key}_ms") or 0) >= 10 else 2),
                     _f(r.get(f"{key}_speedup"), 2, "×"), _f(r.get(f"{key}_efficiency"), 2)]
        line.append(r.get("error", ""))
        table.append(line)
    return md_table(cols, table)


def _f(v, digits, suffix=""):
    if v is None:
        return "–"
    return f"{v:.{digits}f}{suffix}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (or other timm names)")
    ap.add_argument("--variants", help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    ap.add_argument("--iters", type=int, default=30, help="timed passes at batch 1")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters32", type=int, default=5, help="timed passes at batch 32 (0 skips)")
    ap.add_argument("--warmup32", type=int, default=1)
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--gpu-iters", type=int, default=30)
    ap.add_argument("--gpu-warmup", type=int, default=10)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--target-latency", type=float, default=0.5, help="for the hf_prune_lat* variants")
    ap.add_argument("--settings", help=f"comma-separated subset of {','.join(CPU_SETTINGS)} (default: all)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 is steadier on a "
                    "shared machine")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="CPU timings: wall time, or (with --threads 1) the CPU time of the calling thread, "
                         "which a loaded machine does not inflate")
    ap.add_argument("--tp-ratio", type=float, default=0.3, help="Torch-Pruning pruning_ratio (0.3 ≈ 50%% MACs)")
    ap.add_argument("--no-channels-last", action="store_true", help="time CNNs on CPU in NCHW only")
    ap.add_argument("--quick", action="store_true", help="resnet50 + deit_small, few iterations")
    ap.add_argument("--out", default=None, help="stem of the result files (default speed_cpu / speed_gpu)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models = args.models or "resnet50,deit_small_patch16_224"
        args.iters, args.warmup, args.iters32, args.warmup32 = 5, 1, 1, 0
        args.gpu_iters, args.gpu_warmup = 5, 2
    args.settings = args.settings.split(",") if args.settings else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread measures latency only with one intra-op thread: add --threads 1")
    models = args.models.split(",") if args.models else MODELS
    variants = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS)
    if "dense" not in variants:
        variants.insert(0, "dense")
    if not torch_pruning_available():
        variants = [v for v in variants if not v.startswith("torch_pruning")]

    info = env_info()
    print(f"load average at start (1/5/15 min): {info['loadavg_start']} on {info['cores']} cores", flush=True)
    t_all = time.perf_counter()
    rows: list[dict] = []
    for name in models:
        print(f"{name}:", flush=True)
        try:
            rows += bench_model(name, variants, args, lambda s: print(s, flush=True))
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "variant": "dense", "error": first_line(exc),
                         "traceback": traceback.format_exc(limit=-6).replace(os.getcwd() + os.sep, "")})
            print(f"  FAILED {first_line(exc)}", flush=True)
        gc.collect()
    info["total_s"] = time.perf_counter() - t_all
    md = render(rows, info, args) + f"\nTotal wall time: {info['total_s'] / 60:.1f} min\n"
    stem = args.out or ("speed_gpu" if torch.cuda.is_available() and args.gpu_iters > 0 else "speed_cpu")
    paths = write_results(stem, md, {"info": info, "args": vars(args), "rows": rows})
    print()
    print(md)
    print("written:", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
