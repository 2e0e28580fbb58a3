"""DepGraph's sparse learning on a pretrained ImageNet model: with vs without, same budget, distilled on photos.

The harder counterpart of ``sparse_learning.py`` (a ResNet trained here on MNIST): timm
``efficientnet_lite1`` with its ImageNet weights (``benchmarks/pretrained_models.py``), no labels. Every
run distils the model from its frozen dense copy (KL at temperature 1) on random crops of real photos
(``updp_evidence_photos.crops``), in three phases with the same steps, optimizer, crops and schedule:

* ``--sl-steps`` steps of distillation, with ``DepGraphCallback(group_sparsity=λ)`` adding the group
  penalty (**SL**: the paper's squared ``λ Σ_k γ_k ||w_k||²`` and the group lasso) or not (**w/o SL**);
* one-shot DepGraph pruning to ``--target`` of the MACs (group L2, global, round_to 8), the callback's
  ``schedule="oneshot"`` at step ``--sl-steps``;
* ``--ft-steps`` steps of distillation of the pruned model, then compaction.

SGD (momentum 0.9, no weight decay, lr cosine over all steps), batch ``--batch-size``, BatchNorm statistics
frozen: batches of crops of a few photos give BatchNorm statistics far from ImageNet's (in train mode the
distillation loss starts at ~5 nats), and with frozen statistics a penalty of λ = 0.01 already shrinks conv
weights enough to move every normalised output (agreement 0 after 3 steps), hence the small λ values. Reported: top-1 agreement with the dense model and KL(dense || model) on
fixed crops of three held-out photos, after the SL phase, right after pruning and after fine-tuning, and the
share of the units' squared L2 mass the pruned units held just before pruning.

    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning_pretrained.py
    PYTHONPATH=. .venv/bin/python benchmarks/sparse_learning_pretrained.py --quick   # smoke run (not written)
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
import torch.nn.functional as F

from benchmarks.common import env_info, header_md, md_table, write_results
from benchmarks.sparse_learning import variants
from benchmarks.updp_evidence_photos import TEST_PHOTOS, crops, fidelity, freeze_bn


def run(dense, train_images, test, penalty: str, lam: float, seed: int, args) -> dict:
    from hf_prune.engine.importance import unit_scores
    from hf_prune.methods.depgraph.callback import DepGraphCallback

    model = copy.deepcopy(dense).requires_grad_(True)
    steps = args.sl_steps + args.ft_steps
    cb = DepGraphCallback(target_macs=args.target, schedule="oneshot", start=args.sl_steps, end=args.sl_steps,
                          group_sparsity=lam, sparse_penalty=penalty, sparse_alpha=4.0, round_to=8)
    cb.setup(model, total_steps=steps, example_inputs=test[:2])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    model.train()
    freeze_bn(model)
    for step in range(steps):
        if step == args.sl_steps:
            out["after_sl"] = fidelity(model, dense, test)
            g = cb.pruner.graph
            mass = unit_scores(g, "l2")
        cb.step_begin(step)
        if step == args.sl_steps:
            units = torch.cat([grp.units for grp in g.groups])
            out["pruned_mass_share"] = float(mass[cb.pruner.removed].sum() / mass[units].sum())
            out["after_prune"] = fidelity(model, dense, test)
            model.train()
            freeze_bn(model)
        x = crops(train_images, args.batch_size, args.size, gen)
        with torch.no_grad():
            t = dense(x)
        loss = F.kl_div(model(x).log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cb.pre_optimizer_step()
        opt.step()
        cb.optimizer_step()
        sched.step()
    cb.finish()
    out["after_ft"] = fidelity(model, dense, test)
    out["macs_ratio"] = cb.final_stats["macs"] / cb.final_stats["dense_macs"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", type=int, default=1, help="EfficientNet-Lite 1 or 2")
    p.add_argument("--size", type=int, default=96, help="crop size (px)")
    p.add_argument("--sl-steps", type=int, default=100)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target", type=float, default=0.8, help="fraction of the dense MACs kept")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--squared", default="0.0001,0.001", help="λ values of the paper's squared penalty")
    p.add_argument("--lasso", default="0.0001", help="λ values of the group-lasso penalty")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--test-crops", type=int, default=32, help="per held-out photo")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.sl_steps, args.ft_steps, args.seeds, args.test_crops = 3, 3, 1, 4
    torch.set_num_threads(1)
    info = env_info()
    t0 = time.time()
    from benchmarks.pretrained_models import load_efficientnet_lite, photos

    dense = load_efficientnet_lite(args.variant).eval()
    for q in dense.parameters():
        q.requires_grad_(False)
    images = photos()
    train_images = [v for k, v in images.items() if k not in TEST_PHOTOS]
    gen = torch.Generator().manual_seed(0)
    test = torch.cat([crops([images[k]], args.test_crops, args.size, gen) for k in TEST_PHOTOS])
    results = {}
    for name, (penalty, lam) in variants(args).items():
        runs = []
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(run(dense, train_images, test, penalty, lam, seed, args))
            print(f"[{time.time() - t0:6.0f} s] {name} seed {seed}: {runs[-1]}", flush=True)
        results[name] = runs
    data = {"info": info, "args": vars(args), "results": results, "test_photos": TEST_PHOTOS,
            "train_photos": [k for k in images if k not in TEST_PHOTOS], "total_s": time.time() - t0}
    if not args.quick:
        write_results("sparse_learning_pretrained", render(data), data)
    return data


def _ms(xs) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def render(d: dict) -> str:
    a = d["args"]
    notes = [
        f"model: timm `efficientnet_lite1` with ImageNet weights, {a['size']} px crops; no labels: distilled from its "
        "frozen dense copy (KL, T = 1)",
        f"data: random crops (scale 0.25-1, flips) of {', '.join(d['train_photos'])}; test: {a['test_crops']} fixed "
        f"crops of each held-out photo ({', '.join(d['test_photos'])})",
        f"each run: {a['sl_steps']} steps (SL or plain) -> one-shot DepGraph pruning to {a['target']} of the MACs "
        f"(group L2, global, round_to=8) -> {a['ft_steps']} steps; SGD momentum 0.9, lr {a['lr']} cosine over all "
        f"steps, batch {a['batch_size']}, BatchNorm statistics frozen; {a['seeds']} crop orders (seeds), the same for "
        "every variant; sparse_alpha 4 (γ from 1 to 16)",
        f"total wall time: {d['total_s'] / 60:.1f} min, 1 torch thread",
    ]
    md = header_md("DepGraph sparse learning on pretrained EfficientNet-Lite1: with vs without, same budget",
                   d["info"], notes)
    rows = []
    for name, runs in d["results"].items():
        row = [name]
        for k in ("after_sl", "after_prune", "after_ft"):
            row.append(f"{_ms([r[k]['agreement'] for r in runs])} / {statistics.mean(r[k]['kl'] for r in runs):.3f}")
        row += [f"{statistics.mean(r['pruned_mass_share'] for r in runs):.4f}",
                f"{statistics.mean(r['macs_ratio'] for r in runs):.3f}"]
        rows.append(row)
    md += "\n## Agreement with the dense model on held-out photos (mean ± std over seeds) / mean KL\n\n"
    md += md_table(["variant", "after the SL phase", "right after pruning", "after fine-tuning",
                    "pruned units' share of the L2 mass", "MACs kept"], rows)
    return md


if __name__ == "__main__":
    main()
