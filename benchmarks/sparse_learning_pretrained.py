"""DepGraph's sparse learning on a pretrained model: ImageNet EfficientNet-Lite1, with vs without, same budget.

``benchmarks/sparse_learning.py`` compares the paper's sparse learning ("SL") with grouped L2 importance
alone ("w/o SL") on a small ResNet trained on MNIST with SGD. This script makes the same comparison on a
real pretrained model, where there are no labels: every training step is distillation from the dense
model (:func:`hf_prune.recovery.distillation_loss`, the model in eval mode so BatchNorm statistics stay
frozen, as :func:`hf_prune.recover` does), on random views of the calibration photos and skimage's other
images; the metrics are top-1 / top-5 agreement with the dense model and KL(dense || pruned) on random
views of held-out photos (the data split and metrics of ``benchmarks/pretrained.py``).

Each arm, with the same steps, data order and optimizer (AdamW, weight decay 0, warm-up + cosine):

1. ``--sl-steps`` distillation steps from the dense weights, with ``DepGraphCallback(group_sparsity=λ,
   sparse_penalty="squared_decoupled")`` (λ = 0: "w/o SL"; with λ = 0 the student starts equal to its
   teacher, so this phase only moves what rounding and Adam's normalisation make of a near-zero gradient);
2. one-shot DepGraph pruning to ``--target`` of the dense MACs by group L2 (hf_prune's defaults, global,
   round_to 8), twice: ``reconstruct=False`` (isolates SL) and with reconstruction (``calib=``, the default
   when calibration data is given);
3. ``--ft-steps`` distillation steps of fine-tuning (:func:`hf_prune.recover`) of each pruned model.

Reported after every phase: held-out agreement and KL; before pruning, the share of the units' squared L2
mass held by the units that are then pruned. Part ``pilot`` runs the SL phase for ``--pilot-steps`` at
several λ (``--pilot-lams``, decoupled) and at ``--pilot-grad-lam`` in the gradient form
(``sparse_penalty="squared"``, the penalty added to ``.grad``), to pick λ for part ``main`` (``--lams``).

    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning_pretrained.py   # pilot, then main at the pilot's λ
    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning_pretrained.py --parts main --lams 0.3,1
    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning_pretrained.py --quick    # < 1 min, nothing written

Results: ``benchmarks/results/sparse_learning_pretrained.{md,json}`` (each part recorded with its command).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header_md, md_table, run_parts  # noqa: E402
from benchmarks.pretrained import CALIB_PHOTOS, EVAL_PHOTOS, Data, logits, metrics  # noqa: E402
from benchmarks.pretrained_models import load_efficientnet_lite  # noqa: E402

STEM = "sparse_learning_pretrained"


class Setup:
    """The dense model, its frozen teacher copy, the data at ``--size`` and the dense held-out logits."""

    def __init__(self, args):
        from hf_prune.recovery import dense_teacher

        self.dense = load_efficientnet_lite(args.variant)
        cfg = dict(self.dense.pretrained_cfg, input_size=(3, args.size, args.size))
        # Data reads the input size from the timm config; a stand-in carries the reduced one.
        self.data = Data(types.SimpleNamespace(pretrained_cfg=cfg), args.calib_views, args.eval_views)
        self.teacher = dense_teacher(self.dense)
        self.dense_logits = logits(self.dense, self.data.eval)
        self.mean, self.std = cfg["mean"], cfg["std"]


def _schedule(steps: int, warmup: float = 0.05):
    """Linear warm-up then cosine to 0, the schedule of :func:`hf_prune.recover`."""
    warm = max(1, int(round(warmup * steps)))
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


def sl_phase(s: Setup, args, penalty: str, lam: float, steps: int, schedule_steps: int, lr: float):
    """``steps`` distillation steps (of a ``schedule_steps`` schedule) with DepGraph's sparse learning at ``lam``;
    returns the model, the callback (its graph and pruner) and the losses."""
    from hf_prune.methods.depgraph.callback import DepGraphCallback
    from hf_prune.recovery import _ImageViews, distillation_loss

    model = copy.deepcopy(s.dense).eval()
    cb = DepGraphCallback(target_macs=args.target, schedule="oneshot", start=schedule_steps, end=schedule_steps,
                          group_sparsity=lam, sparse_penalty=penalty, sparse_alpha=4.0)
    cb.setup(model, total_steps=schedule_steps + 1, example_inputs=s.data.example)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule_steps))
    views = iter(_ImageViews(s.data.raw_calib, (args.size, args.size), torch.tensor(s.mean).view(3, 1, 1),
                             torch.tensor(s.std).view(3, 1, 1), args.batch, True, (0.25, 1.0),
                             torch.Generator().manual_seed(args.seed)))
    losses = []
    for step in range(steps):
        cb.step_begin(step)
        x = next(views)
        with torch.no_grad():
            target = s.teacher(x)
        loss = distillation_loss(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cb.pre_optimizer_step(opt)
        opt.step()
        cb.optimizer_step()
        sched.step()
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    opt.zero_grad(set_to_none=True)
    return model, cb, losses


def pruned_mass_share(cb, target: float) -> float:
    """Share of the units' squared L2 mass held by the units group-L2 pruning to ``target`` MACs removes."""
    from hf_prune.engine.importance import unit_scores

    g = cb.pruner.graph
    mass = unit_scores(g, "l2")
    removed = cb.pruner.plan(target_macs=target)
    units = torch.cat([grp.units for grp in g.groups])
    return float(mass[removed].sum() / mass[units].sum())


def one_shot(model, s: Setup, args, reconstruct: bool):
    import hf_prune
    from hf_prune.metrics.profiling import count_macs

    model = copy.deepcopy(model)
    t = time.perf_counter()
    options = dict(calib=list(s.data.calib.split(24))) if reconstruct else dict(reconstruct=False)
    hf_prune.prune(model, method="depgraph", target_macs=args.target, example_inputs=s.data.example, **options)
    seconds = time.perf_counter() - t
    return model, seconds, count_macs(model, s.data.example) / count_macs(s.dense, s.data.example)


def fine_tune(model, s: Setup, args):
    import hf_prune

    model = copy.deepcopy(model)
    stats = hf_prune.recover(model, s.teacher, s.data.raw_calib, steps=args.ft_steps, lr=args.lr,
                             batch_size=args.batch, size=(args.size, args.size), mean=s.mean, std=s.std,
                             seed=args.seed + 1, progress=False)
    return model, stats


def _m(model, s: Setup) -> dict:
    return {k: round(v, 5) for k, v in metrics(model, s.data, s.dense_logits).items()}


def arm(s: Setup, args, penalty: str, lam: float) -> dict:
    t0 = time.perf_counter()
    model, cb, losses = sl_phase(s, args, penalty, lam, args.sl_steps, args.sl_steps, args.sl_lr)
    out = {"penalty": penalty, "lam": lam, "sl_loss_first": losses[0], "sl_loss_last": sum(losses[-10:]) / 10,
           "after_sl": _m(model, s), "pruned_mass_share": pruned_mass_share(cb, args.target),
           "sl_seconds": round(time.perf_counter() - t0, 1)}
    for key, rec in (("plain", False), ("recon", True)):
        pruned, seconds, ratio = one_shot(model, s, args, rec)
        out[f"after_prune_{key}"] = _m(pruned, s)
        out[f"macs_{key}"] = round(ratio, 4)
        out[f"prune_seconds_{key}"] = round(seconds, 1)
        t = time.perf_counter()
        tuned, stats = fine_tune(pruned, s, args)
        out[f"after_ft_{key}"] = _m(tuned, s)
        out[f"ft_loss_last_{key}"] = stats["loss_last"]
        out[f"ft_seconds_{key}"] = round(time.perf_counter() - t, 1)
        print(f"  {key}: {out[f'after_prune_{key}']} -> {out[f'after_ft_{key}']}", flush=True)
    return out


def _lams(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def part_pilot(args) -> dict:
    s = Setup(args)
    runs = []
    # λ = 0 at the fine-tuning lr: how far AdamW moves the dense model by itself (its gradient starts at ~0)
    settings = [("squared_decoupled", 0.0, args.lr), ("squared_decoupled", 0.0, args.sl_lr)]
    settings += [("squared_decoupled", lam, args.sl_lr) for lam in _lams(args.pilot_lams)]
    settings += [("squared", lam, args.sl_lr) for lam in _lams(args.pilot_grad_lam)]
    for penalty, lam, lr in settings:
        t = time.perf_counter()
        model, cb, losses = sl_phase(s, args, penalty, lam, args.pilot_steps, args.sl_steps, lr)
        row = {"penalty": penalty, "lam": lam, "lr": lr, "steps": len(losses), "loss_last": losses[-1],
               "after_sl": _m(model, s), "pruned_mass_share": pruned_mass_share(cb, args.target)}
        row["after_prune_plain"] = _m(one_shot(model, s, args, False)[0], s)
        row["seconds"] = round(time.perf_counter() - t, 1)
        print(f"pilot {penalty} λ={lam:g}: {row}", flush=True)
        runs.append(row)
    args.chosen_lams = choose_lams(runs, args.sl_lr)
    return {"runs": runs, "chosen_lams": args.chosen_lams}


def choose_lams(runs: list, lr: float) -> list[float]:
    """The rule fixed before the pilot: the two largest decoupled λ > 0 whose SL phase keeps held-out top-1
    agreement ≥ 0.9 (SL is meant to empty units, not to change the model's predictions); else the two smallest."""
    tried = sorted(r["lam"] for r in runs if r["penalty"] == "squared_decoupled" and r["lam"] > 0 and r["lr"] == lr)
    ok = [r["lam"] for r in runs if r["penalty"] == "squared_decoupled" and r["lam"] > 0 and r["lr"] == lr
          and r["after_sl"]["top1"] >= 0.9]
    return sorted(ok)[-2:] if len(ok) >= 2 else tried[:2]


def part_main(args) -> dict:
    s = Setup(args)
    arms = {}
    if args.lams == "auto":
        lams = getattr(args, "chosen_lams", None)
        if lams is None:
            from benchmarks.common import RESULTS

            lams = json.loads((Path(args.cache) if args.cache else RESULTS / f"{STEM}.json").read_text())[
                "runs"]["pilot"]["result"]["chosen_lams"]
    else:
        lams = _lams(args.lams)
    for name, penalty, lam in [("w/o SL", "squared_decoupled", 0.0)] + [
            (f"SL decoupled λ={lam:g}", "squared_decoupled", lam) for lam in lams]:
        print(name, flush=True)
        arms[name] = arm(s, args, penalty, lam)
        print(f"{name}: {arms[name]}", flush=True)
    return {"arms": arms, "lams": lams}


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def _cells(m: dict) -> str:
    return f"{_f(m['top1'])} / {_f(m['top5'])} / {_f(m['kl'])}"


def compose(data: dict) -> str:
    runs = data["runs"]
    first = next(iter(runs.values()))
    a = first["args"]
    notes = [
        f"model: timm efficientnet_lite{a['variant']} with its ImageNet weights, run at {a['size']}×{a['size']} px "
        "(the model's own resolution is 240; reduced to fit the compute budget of a shared 2-core CPU); BatchNorm "
        "frozen (eval mode) throughout",
        f"data: distillation pool and reconstruction views = the photos {', '.join(CALIB_PHOTOS)} plus skimage's "
        f"other images ({a['calib_views']} views each for reconstruction); held out: {', '.join(EVAL_PHOTOS)}, "
        f"{a['eval_views']} random views each; no labels",
        f"every training step: distillation from the dense model (KL, T=1), batch {a['batch']} fresh random views, "
        f"AdamW (weight decay 0, 5% warm-up + cosine per phase) at lr {a['sl_lr']} in the SL (or plain) phase and "
        f"{a['lr']} in fine-tuning (at {a['lr']} the dense model drifts away from itself under AdamW even without a "
        f"penalty: see the pilot's λ = 0 rows); data seed {a['seed']} (the same data order for every arm); one seed "
        "(the compute budget allowed no more)",
        f"pruning: one-shot DepGraph to {a['target']} of the dense MACs by group L2 (global, round_to 8), "
        "`reconstruct=False` and with reconstruction (`calib=`, hf_prune's default then)",
        "metrics: top-1 agreement / top-5 agreement / KL(dense ‖ model) in nats on the held-out views; "
        "'pruned L2² share' = the share of the units' squared L2 mass held by the units then pruned",
    ]
    md = header_md("DepGraph sparse learning on a pretrained EfficientNet-Lite1: with vs without", first["env"], notes)
    for name, run in runs.items():
        md += f"\n- part `{name}`: `{run['env']['command']}` ({run['env']['date']}, load at start "
        md += f"{run['env']['loadavg_start']})\n"
    if "pilot" in runs:
        p = runs["pilot"]
        md += (f"\n## Pilot: the SL phase alone, first {p['args']['pilot_steps']} of {p['args']['sl_steps']} steps\n\n"
               "`squared` adds 2λγw to the gradient, which AdamW then normalises; `squared_decoupled` shrinks each "
               "unit by 1 − lr·2λγ per step.\n\n")
        rows = [[r["penalty"], f"{r['lam']:g}", f"{r['lr']:g}", r["steps"], _f(r["loss_last"], 4), _cells(r["after_sl"]),
                 _f(r["pruned_mass_share"], 4), _cells(r["after_prune_plain"])] for r in p["result"]["runs"]]
        md += md_table(["penalty", "λ", "lr", "steps", "last loss", "after SL (top-1 / top-5 / KL)", "pruned L2² share",
                        "pruned, no reconstruction"], rows)
        md += (f"\nλ for the main comparison (the two largest decoupled λ keeping top-1 agreement ≥ 0.9 after the "
               f"pilot's steps): {', '.join(f'{v:g}' for v in p['result']['chosen_lams'])}\n")
    if "main" in runs:
        m = runs["main"]
        ma = m["args"]
        md += (f"\n## With vs without SL: {ma['sl_steps']} SL (or plain) steps → one-shot to {ma['target']} MACs → "
               f"{ma['ft_steps']} fine-tuning steps\n\nEach cell: top-1 agreement / top-5 agreement / KL.\n\n")
        rows = []
        for name, r in m["result"]["arms"].items():
            rows.append([name, _cells(r["after_sl"]), _f(r["pruned_mass_share"], 4), _cells(r["after_prune_plain"]),
                         _cells(r["after_ft_plain"]), _cells(r["after_prune_recon"]), _cells(r["after_ft_recon"]),
                         f"{r['macs_plain']:.3f} / {r['macs_recon']:.3f}"])
        md += md_table(["arm", "after SL phase (dense)", "pruned L2² share", "pruned, no reconstruction",
                        "+ fine-tuning", "pruned + reconstruction", "+ fine-tuning", "MACs kept (plain / recon)"], rows)
        md += "\nTimes (s): " + "; ".join(
            f"{n}: SL {r['sl_seconds']}, fine-tuning {r['ft_seconds_plain']} + {r['ft_seconds_recon']}, "
            f"reconstruction {r['prune_seconds_recon']}" for n, r in m["result"]["arms"].items()) + "\n"
    md += "\n## Reading\n\n" + reading(runs) + "\n"
    return md


def reading(runs: dict) -> str:
    """What the numbers say, generated from them (no claims beyond the measurement)."""
    out = []
    if "pilot" in runs:
        r = runs["pilot"]["result"]["runs"]
        zero = {x["lr"]: x for x in r if x["lam"] == 0}
        for lr, x in sorted(zero.items(), reverse=True):
            out.append(f"- Pilot, λ = 0 (plain distillation of the dense model into itself) at lr {lr:g}: top-1 "
                       f"agreement {x['after_sl']['top1']:.3f}, KL {x['after_sl']['kl']:.4f} after {x['steps']} steps.")
        for x in r:
            if x["penalty"] == "squared":
                out.append(f"- Pilot, gradient form (`squared`, added to `.grad`, then AdamW) at λ = {x['lam']:g}, lr "
                           f"{x['lr']:g}: top-1 agreement {x['after_sl']['top1']:.3f}, KL {x['after_sl']['kl']:.4f}.")
    if "main" in runs:
        arms = runs["main"]["result"]["arms"]
        n_eval = 5 * runs["main"]["args"]["eval_views"]
        base = arms["w/o SL"]
        for name, a in arms.items():
            if name == "w/o SL":
                continue
            out.append(f"- {name} vs w/o SL: pruned units' L2² share {a['pruned_mass_share']:.4f} vs "
                       f"{base['pruned_mass_share']:.4f}; right after pruning top-1 {a['after_prune_plain']['top1']:.3f} "
                       f"vs {base['after_prune_plain']['top1']:.3f} (no reconstruction), "
                       f"{a['after_prune_recon']['top1']:.3f} vs {base['after_prune_recon']['top1']:.3f} "
                       f"(reconstruction); after fine-tuning {a['after_ft_plain']['top1']:.3f} vs "
                       f"{base['after_ft_plain']['top1']:.3f} (no reconstruction), {a['after_ft_recon']['top1']:.3f} vs "
                       f"{base['after_ft_recon']['top1']:.3f} (reconstruction).")
        for key, label in (("plain", "without reconstruction"), ("recon", "with reconstruction")):
            best = max((a for n, a in arms.items() if n != "w/o SL"), key=lambda a: a[f"after_ft_{key}"]["top1"],
                       default=None)
            if best is None:
                continue
            diff = best[f"after_ft_{key}"]["top1"] - base[f"after_ft_{key}"]["top1"]
            dkl = best[f"after_ft_{key}"]["kl"] - base[f"after_ft_{key}"]["kl"]
            # One seed: a gain counts only beyond twice the binomial standard error of a difference of two
            # agreement rates on n_eval views, and only when the KL agrees.
            p = base[f"after_ft_{key}"]["top1"]
            noise = 2 * math.sqrt(2 * max(p * (1 - p), 1 / n_eval) / n_eval)
            verdict = ("reproduced" if diff > noise and dkl < 0 else
                       "not reproduced" if diff <= 0 and dkl >= 0 else
                       f"not separable from noise (|difference| within {noise:.3f})" if abs(diff) <= noise else "mixed")
            out.append(f"- SL better than w/o SL after fine-tuning, {label}: **{verdict}** here (the best SL arm by "
                       f"top-1: {diff:+.3f} top-1 agreement, {round(diff * n_eval):+d} of {n_eval} held-out views, "
                       f"KL {dkl:+.4f}; one seed).")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="pilot,main", help="comma-separated: pilot, main")
    p.add_argument("--variant", type=int, default=1)
    p.add_argument("--size", type=int, default=160, help="input resolution (the model's own is 240)")
    p.add_argument("--sl-steps", type=int, default=120)
    p.add_argument("--ft-steps", type=int, default=80)
    p.add_argument("--target", type=float, default=0.8, help="fraction of the dense MACs kept")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr of the fine-tuning phase")
    p.add_argument("--sl-lr", type=float, default=2e-5, help="AdamW lr of the SL (or plain) phase")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lams", default="auto", help="λ of the decoupled squared penalty in part main (auto: the "
                   "pilot's choice, see choose_lams)")
    p.add_argument("--pilot-steps", type=int, default=30)
    p.add_argument("--pilot-lams", default="0.1,0.3,1", help="λ of the decoupled penalty in the pilot")
    p.add_argument("--pilot-grad-lam", default="0.005", help="λ of the gradient form (under AdamW) in the pilot")
    p.add_argument("--calib-views", type=int, default=4)
    p.add_argument("--eval-views", type=int, default=24)
    p.add_argument("--cache", default=None, help="another JSON cache (the result files are then not written)")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script (< 1 min, nothing written)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.sl_steps, args.ft_steps, args.pilot_steps, args.batch = 96, 2, 2, 2, 4
        args.calib_views, args.eval_views, args.pilot_lams, args.pilot_grad_lam = 1, 2, "0.3,1", "0.005"
        args.cache = args.cache or str(Path(tempfile.mkdtemp()) / f"{STEM}_quick.json")
    args.parts = [x for x in args.parts.split(",") if x]
    os.environ.setdefault("HF_PRUNE_DISABLE_PROGRESS", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gradient form under AdamW warns; the pilot measures it on purpose
        return run_parts(STEM, {"pilot": part_pilot, "main": part_main}, args, compose, cache=args.cache)


if __name__ == "__main__":
    main()
