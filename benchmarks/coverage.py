"""Architecture coverage of hf_prune's structured (DepGraph) pruning.

For each model (timm with random weights, or a small transformers model built from a config):
dense params and MACs; ``prune(..., target_macs=T, compact=False)``; forward of the masked model;
``compact``; forward of the compacted model; equivalence masked vs compacted (max |diff| / max |out|
<= 1e-4, on the tracing input and on a fresh batch of 2); kept params and MACs. Every model runs
inside its own try/except and time limit, so one failure does not stop the run.

MACs come from ``hf_prune.DependencyGraph(model, x).macs()`` (counts attention, which torch's
FlopCounterMode misses on CPU); the ratio from ``hf_prune.metrics.profiling.count_macs`` is kept in the JSON
as a cross-check.

    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py            # full list
    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --quick    # 8 models, smoke run
    PYTHONPATH=. .venv/bin/python benchmarks/coverage.py --models resnet18,hf:ViTForImageClassification
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import os
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (ModelTimeout, build, count_params, engine_macs, env_info, first_line,
                               flop_counter_macs, header_md, hf_model_names, md_table, perturb_,
                               rel_err, run_logits, time_limit, write_results)

TOL = 1e-4

# (category, timm model names). All exist in timm 1.0.31; default input size of each model.
TIMM_MODELS: dict[str, list[str]] = {
    "CNN": ["resnet18", "resnet50", "seresnet18", "resnext26ts", "resnext50_32x4d", "res2net50_26w_4s",
            "regnetx_002", "regnety_002", "regnetz_b16", "densenet121", "vgg11_bn", "dla34", "dpn48b",
            "hrnet_w18_small", "cspresnet50", "cspdarknet53", "darknet53", "repvgg_a0", "selecsls42b",
            "ese_vovnet19b_dw", "rexnet_100", "inception_v3", "xception41", "hgnetv2_b0",
            "sebotnet33ts_256"],
    "mobile": ["mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv4_conv_small", "efficientnet_b0",
               "efficientnetv2_rw_t", "mnasnet_100", "ghostnet_100", "lcnet_050", "repvit_m0_9",
               "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "fastvit_t8", "efficientvit_m0",
               "efficientvit_b0", "starnet_s1"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto", "inception_next_tiny", "rdnet_tiny"],
    "ViT": ["vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
            "deit_small_patch16_224", "deit3_small_patch16_224", "flexivit_small", "eva02_tiny_patch14_224",
            "beit_base_patch16_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "levit_128s",
            "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "twins_svt_small", "crossvit_tiny_240",
            "pvt_v2_b0", "coat_lite_tiny", "davit_tiny", "focalnet_tiny_srf", "mvitv2_tiny", "hiera_tiny_224",
            "gcvit_xxtiny"],
    "hybrid/MLP": ["coatnet_0_rw_224", "maxvit_nano_rw_256", "poolformer_s12", "convmixer_768_32",
                   "edgenext_xx_small", "tiny_vit_5m_224", "nextvit_small", "visformer_tiny", "mambaout_femto",
                   "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224"],
}

QUICK = ["resnet18", "mobilenetv2_100", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224",
         "swin_tiny_patch4_window7_224", "hf:ViTForImageClassification",
         "hf:TimmWrapperForImageClassification(resnet18)"]


def category(name: str) -> str:
    if name.startswith("hf:"):
        return "transformers"
    for cat, names in TIMM_MODELS.items():
        if name in names:
            return cat
    return "other"


def all_models() -> list[str]:
    return [n for names in TIMM_MODELS.values() for n in names] + hf_model_names()


def _batch2(x):
    """A fresh random batch of 2 shaped like ``x`` (a tensor or a dict of tensors)."""
    g = torch.Generator().manual_seed(1)
    if isinstance(x, dict):
        return {k: torch.randn((2, *v.shape[1:]), generator=g) if torch.is_tensor(v) else v
                for k, v in x.items()}
    return torch.randn((2, *x.shape[1:]), generator=g)


def _shape(x) -> str:
    t = x if torch.is_tensor(x) else next(v for v in x.values() if torch.is_tensor(v))
    return "x".join(str(d) for d in t.shape[1:])


def run_one(name: str, target_macs: float, timeout: float | None, perturb: bool = True) -> dict:
    from hf_prune.api import compact, prune

    row: dict = {"model": name, "category": category(name), "status": "fail", "stage": "build",
                 "error": None}
    t_start = time.perf_counter()
    stage = "build"
    try:
        with time_limit(timeout):
            torch.manual_seed(0)
            model, x = build(name)
            if perturb:
                perturb_(model)
            x2 = _batch2(x)
            row["input"] = _shape(x)
            stage = "dense-count"
            row["params_dense"] = count_params(model)
            y_dense = run_logits(model, x)
            row["macs_dense"] = engine_macs(model, x)
            try:
                row["macs_dense_fc"] = flop_counter_macs(model, x)
            except Exception as exc:  # noqa: BLE001 - only a cross-check
                row["macs_dense_fc"] = None
                row["fc_error"] = first_line(exc)

            stage = "prune"
            t0 = time.perf_counter()
            try:
                prune(model, method="depgraph", example_inputs=x, target_macs=target_macs, compact=False)
            except Exception:
                # transactional: the model must be unchanged after a failed prune
                try:
                    row["restored_after_failure"] = rel_err(y_dense, run_logits(model, x)) <= TOL
                except Exception:  # noqa: BLE001
                    row["restored_after_failure"] = False
                raise
            row["prune_s"] = time.perf_counter() - t0

            stage = "forward-masked"
            y_m = run_logits(model, x)
            if not torch.isfinite(y_m).all():
                raise RuntimeError("masked model output is not finite")
            stage = "forward-masked-batch2"
            y_m2 = run_logits(model, x2)

            stage = "compact"
            t0 = time.perf_counter()
            compact(model)
            row["compact_s"] = time.perf_counter() - t0

            stage = "forward-compact"
            y_c = run_logits(model, x)
            stage = "forward-compact-batch2"
            y_c2 = run_logits(model, x2)

            stage = "equivalence"
            row["rel_err"] = max(rel_err(y_m, y_c), rel_err(y_m2, y_c2))
            row["equivalent"] = row["rel_err"] <= TOL

            stage = "count"
            row["params_pruned"] = count_params(model)
            row["params_ratio"] = row["params_pruned"] / row["params_dense"]
            row["macs_pruned"] = engine_macs(model, x)
            row["macs_ratio"] = row["macs_pruned"] / row["macs_dense"]
            if row.get("macs_dense_fc"):
                try:
                    row["macs_ratio_fc"] = flop_counter_macs(model, x) / row["macs_dense_fc"]
                except Exception:  # noqa: BLE001
                    row["macs_ratio_fc"] = None
            if not row["equivalent"]:
                stage = "equivalence"
                raise AssertionError(f"compacted output differs from masked output: rel err "
                                     f"{row['rel_err']:.2e} > {TOL:g}")
            row["status"] = "ok"
            row["stage"] = None
    except (Exception, ModelTimeout) as exc:  # noqa: BLE001 - one model must not stop the run
        row["stage"] = stage
        row["error"] = first_line(exc)
        row["traceback"] = traceback.format_exc(limit=-6).replace(os.getcwd() + os.sep, "")
    row["time_s"] = time.perf_counter() - t_start
    gc.collect()
    return row


def _fmt_num(v, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    for t, s in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= t:
            return f"{v / t:.2f}{s}{unit}"
    return f"{v:.0f}{unit}"


def _mark(row, key_stage_order: list[str], stage: str) -> str:
    """✓ if the row got past ``stage``, ✗ if it failed there, blank if it never got there."""
    if row["status"] == "ok":
        return "✓"
    failed = row["stage"]
    order = key_stage_order
    if failed not in order:
        return "?"
    if order.index(stage) < order.index(failed):
        return "✓"
    if order.index(stage) == order.index(failed):
        return "✗"
    return ""


STAGES = ["build", "dense-count", "prune", "forward-masked", "forward-masked-batch2", "compact",
          "forward-compact", "forward-compact-batch2", "equivalence", "count"]


def render(rows: list[dict], info: dict, target_macs: float) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    cats = sorted({r["category"] for r in rows}, key=lambda c: list(TIMM_MODELS).index(c)
                  if c in TIMM_MODELS else 99)
    notes = [
        f"target: `prune(model, method='depgraph', example_inputs=x, target_macs={target_macs}, "
        "compact=False)` then `compact(model)`; default options (importance l2, global, round_to=8, "
        "prune_stem=False)",
        "models: random weights (timm `pretrained=False`, transformers from small configs) plus small "
        "noise on every parameter and BN statistic (so zero-initialised gammas/layer-scales do not make "
        "the equivalence check trivial); input batch 1 at the model's default size",
        "MACs: `hf_prune.DependencyGraph(model, x).macs()` (counts attention; torch's FlopCounterMode "
        "does not count CPU fused attention `aten._scaled_dot_product_flash_attention_for_cpu`). "
        "`macs_ratio_fc` in the JSON is the same ratio from `hf_prune.metrics.profiling.count_macs`, as a cross-check",
        f"equivalence: max |masked - compact| / max |masked| on the tracing input and on a fresh batch "
        f"of 2, must be <= {TOL:g}",
        "time: whole row (build, counting, prune, two forwards, compact, two forwards, recount), seconds",
    ]
    out = [header_md("Coverage: structured pruning of timm and transformers architectures", info, notes)]
    out.append("\n## Summary\n")
    srows = []
    for c in cats:
        rs = [r for r in rows if r["category"] == c]
        srows.append([c, len(rs), sum(r["status"] == "ok" for r in rs),
                      sum(r["status"] != "ok" for r in rs)])
    srows.append(["**all**", len(rows), len(ok), len(rows) - len(ok)])
    out.append(md_table(["category", "models", "ok", "failed"], srows))
    by_stage: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
    if by_stage:
        out.append("\nFailures by stage: " + ", ".join(f"{k}: {v}" for k, v in by_stage.items()) + "\n")
    if ok:
        mr = sorted(r["macs_ratio"] for r in ok)
        out.append(f"\nMACs kept (ok rows): median {mr[len(mr) // 2]:.3f}, min {mr[0]:.3f}, max {mr[-1]:.3f}; "
                   f"max equivalence error {max(r['rel_err'] for r in ok):.1e}\n")

    cols = ["model", "category", "input", "params", "MACs", "prune", "fwd masked", "compact",
            "fwd compact", "equiv (rel err)", "params kept", "MACs kept", "time s", "error"]
    table = []
    for r in rows:
        eq = "–"
        if r.get("rel_err") is not None:
            eq = ("✓ " if r.get("equivalent") else "✗ ") + f"{r['rel_err']:.1e}"
        fwd_m = _mark(r, STAGES, "forward-masked")
        if fwd_m == "✓":
            fwd_m = _mark(r, STAGES, "forward-masked-batch2")
        fwd_c = _mark(r, STAGES, "forward-compact")
        if fwd_c == "✓":
            fwd_c = _mark(r, STAGES, "forward-compact-batch2")
        err = ""
        if r["status"] != "ok":
            err = f"[{r['stage']}] {r['error']}"
            if r.get("restored_after_failure") is not None:
                err += " (model restored)" if r["restored_after_failure"] else " (model NOT restored)"
        table.append([
            f"`{r['model']}`", r["category"], r.get("input", "–"), _fmt_num(r.get("params_dense")),
            _fmt_num(r.get("macs_dense")), _mark(r, STAGES, "prune"), fwd_m, _mark(r, STAGES, "compact"),
            fwd_c, eq,
            f"{r['params_ratio']:.3f}" if r.get("params_ratio") is not None else "–",
            f"{r['macs_ratio']:.3f}" if r.get("macs_ratio") is not None else "–",
            f"{r['time_s']:.1f}", err])
    out.append("\n## Per model\n")
    out.append(md_table(cols, table))
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated list (timm names or hf:... names)")
    ap.add_argument("--quick", action="store_true", help=f"a smoke subset of {len(QUICK)} models")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per model (0 disables)")
    ap.add_argument("--no-perturb", action="store_true", help="keep the raw random init")
    ap.add_argument("--out", default="coverage", help="stem of the result files in benchmarks/results/")
    ap.add_argument("--list", action="store_true", help="print the model list and exit")
    args = ap.parse_args(argv)

    models = args.models.split(",") if args.models else (QUICK if args.quick else all_models())
    if args.list:
        print("\n".join(models))
        return 0
    from hf_prune.core.progress import progress

    info = env_info()
    rows = []
    t_all = time.perf_counter()
    bar = progress(total=len(models), desc="coverage", unit="model")  # the model being pruned, elapsed, ETA
    for i, name in enumerate(models):
        bar.set_postfix_str(name.strip())
        row = run_one(name.strip(), args.target_macs, args.timeout or None, perturb=not args.no_perturb)
        rows.append(row)
        status = "ok " if row["status"] == "ok" else f"FAIL [{row['stage']}] {row['error']}"
        extra = (f" macs {row['macs_ratio']:.3f} params {row['params_ratio']:.3f} err {row['rel_err']:.1e}"
                 if row["status"] == "ok" else "")
        bar.write(f"[{i + 1}/{len(models)}] {name}: {status}{extra} ({row['time_s']:.1f} s)")
        bar.update(1)
    bar.close()
    info["total_s"] = time.perf_counter() - t_all
    md = render(rows, info, args.target_macs)
    md += f"\nTotal wall time: {info['total_s'] / 60:.1f} min\n"
    paths = write_results(args.out, md, {"info": info, "target_macs": args.target_macs, "rows": rows})
    print()
    print(md)
    print("written:", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
