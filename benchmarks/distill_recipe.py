"""Which distillation recipe repairs a reconstructed pretrained model? ``hf_prune.recover`` variants, same start.

EfficientNet-Lite{1,2} (ImageNet weights) is cut by DepGraph's defaults (L2 groups) to ``--target`` of its
MACs and reconstructed (``bn="mean"``), exactly as the ``+ reconstruction + BN mean correction`` row of
``benchmarks/pretrained.py``, on the same photos; then each recipe (``recover`` keyword arguments) distils
the dense model into a copy of it for ``--steps`` steps (batch 16, views of the calibration pool only) and
the held-out agreement and KL are measured.

    PYTHONPATH=. .venv/bin/python benchmarks/distill_recipe.py 2 0.8 100 "lr=1e-4,mixup=1.0" "lr=2e-5"

Prints one line per recipe: the recipe, the held-out metrics, the mean distillation loss on the pool over
the first step and the last ten, and the seconds.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.pretrained as P  # noqa: E402
from benchmarks.pretrained_models import load_efficientnet_lite  # noqa: E402


def main(argv=None):
    import hf_prune

    argv = sys.argv[1:] if argv is None else argv
    variant, target, steps, recipes = int(argv[0]), float(argv[1]), int(argv[2]), argv[3:]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = load_efficientnet_lite(variant)
    data = P.Data(dense, 4, 8)
    dense_logits = P.logits(dense, data.eval)
    pruned, keep, _ = P.structured(dense, data, target, "l2")
    start, _ = P.reconstructed(pruned, dense, data, keep, bn="mean")
    print("start", P.metrics(start, data, dense_logits), flush=True)
    for spec in recipes:
        options = {k: float(v) for k, v in (item.split("=") for item in spec.split(","))}
        model, t = copy.deepcopy(start), time.perf_counter()
        stats = hf_prune.recover(model, dense, data.raw_calib, steps=steps, batch_size=16, progress=False, **options)
        print(spec, P.metrics(model, data, dense_logits), round(stats["loss_first"], 3), round(stats["loss_last"], 3),
              round(time.perf_counter() - t), flush=True)


if __name__ == "__main__":
    main()
