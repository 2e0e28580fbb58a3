"""oViT's calibration batches for an eval-mode Fisher (the rest of the paper's gradual recipe is general:
learning-rate restarts in :mod:`hf_prune.trainer.restarts`, distillation in :mod:`hf_prune.trainer.distill`).

The paper (Kuznedelev et al., arXiv 2210.09223) prunes gradually — a cubic schedule, e.g. 40% → 75% with
a pruning step every 20 epochs — and after every pruning step restarts the learning rate and lets it
decay until the next one (a cyclic schedule), then fine-tunes at the final sparsity; the dense model is
the teacher of a distillation loss. The OBS step's Fisher comes from mini-batch gradients of the
calibration loss with the model in **eval mode** (no dropout, no drop-path, BatchNorm statistics fixed).

* :func:`calibration_batches` / :class:`CalibrationBatches` — ``m`` distinct mini-batches drawn once
  (seeded) from a training dataset, collated on demand, identical on every pass: the ``calib=`` of
  :func:`~hf_prune.methods.ovit.obs.ovit_prune`, whose gradient passes run in eval mode, so that a
  callback's Fisher does not come from training-mode gradients after clipping.
  :func:`calibration_from_dataloader` takes the dataset and collator from a training loader.

End to end: ``hf-prune train --method ovit --lr-restarts linear --distill ...``, or in Python
``DistillationTrainer(teacher=dense_teacher(model), callbacks=[OViTCallback(...), LRRestartsCallback()])``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...core.checks import check_int
from ...errors import PruningError

__all__ = ["CalibrationBatches", "calibration_batches", "calibration_from_dataloader"]


# ----------------------------------------------------------------------------------------- calibration


class CalibrationBatches:
    """A fixed list of mini-batches of a dataset, collated when iterated: the same batches, in the same
    order, on every pass (what the memory-bounded oViT needs when it repeats the gradient passes per
    group of layers), without holding them all in memory. ``len()`` is the number of batches."""

    def __init__(self, dataset, indices: Sequence[Sequence[int]], collate_fn: Callable | None = None):
        self.dataset = dataset
        self.indices = [list(map(int, b)) for b in indices]
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for batch in self.indices:
            yield self.collate_fn([self.dataset[i] for i in batch])


def calibration_batches(dataset, num_batches: int, batch_size: int, *, collate_fn: Callable | None = None,
                        seed: int = 0) -> CalibrationBatches:
    """``num_batches`` mini-batches of ``batch_size`` items drawn without replacement from ``dataset``
    with a seeded generator of its own (the global RNG is untouched). With fewer than
    ``num_batches × batch_size`` items, as many full batches as the dataset holds (at least one)."""
    num_batches = check_int("num_batches", num_batches, meaning="mini-batch gradients for the Fisher")
    batch_size = check_int("batch_size", batch_size)
    try:
        n = len(dataset)
    except TypeError:
        raise PruningError(f"calibration_batches needs a dataset with len() and indexing, got "
                           f"{type(dataset).__name__}; pass calib= (a list of batches) instead") from None
    if n == 0:
        raise PruningError("calibration_batches: the dataset is empty")
    count = max(1, min(num_batches, n // batch_size))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: count * batch_size]
    return CalibrationBatches(dataset, perm.view(count, -1).tolist() if count * batch_size <= n
                              else [perm.tolist()], collate_fn)


def calibration_from_dataloader(dataloader, num_batches: int, batch_size: int | None = None, *,
                                seed: int = 0) -> CalibrationBatches:
    """:func:`calibration_batches` from a training loader's dataset and collator (batch size: the
    loader's, unless given)."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None:
        raise PruningError("the dataloader has no .dataset to draw calibration batches from; pass calib=")
    size = batch_size or getattr(dataloader, "batch_size", None) or 16
    return calibration_batches(dataset, num_batches, size, collate_fn=getattr(dataloader, "collate_fn", None),
                               seed=seed)
