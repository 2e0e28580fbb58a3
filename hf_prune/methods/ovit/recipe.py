"""oViT's gradual recipe around the OBS step: calibration batches for an eval-mode Fisher, learning-rate
restarts at every pruning step, and distillation from the dense model.

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
* :func:`restart_lr_lambda` / :func:`restart_lr_scheduler` — the cyclic learning-rate multiplier:
  1 at every pruning step (optionally after a short warm-up), decaying (``"linear"`` or ``"cosine"``)
  to ``min_ratio`` just before the next pruning step, and over the final fine-tuning after the last.
* :func:`distillation_loss` and :func:`dense_teacher` — soft-target distillation (KL at temperature
  ``T``, scaled by ``T²``) from a frozen copy of the dense model, mixed with the label loss.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...core.checks import check_choice, check_fraction, check_int, check_number
from ...errors import PruningError

__all__ = ["CalibrationBatches", "calibration_batches", "calibration_from_dataloader", "restart_lr_lambda",
           "restart_lr_scheduler", "distillation_loss", "dense_teacher", "DECAYS"]

DECAYS = ("linear", "cosine", "constant")


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


# ----------------------------------------------------------------------------------------- learning rate


def restart_lr_lambda(prune_steps: Sequence[int], total_steps: int, *, decay: str = "linear",
                      min_ratio: float = 0.0, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier of oViT's cyclic schedule, for ``torch.optim.lr_scheduler.LambdaLR``.

    Steps are optimizer steps. A cycle starts at every step of ``prune_steps`` (the pruning steps of the
    sparsity schedule, e.g. ``schedule.pruning_steps(total_steps)``) and the last one runs to
    ``total_steps`` (the final fine-tuning); training before the first pruning step is one more cycle
    from step 0. Within a cycle of length ``L`` the multiplier rises linearly over
    ``warmup_steps`` (capped at ``L``) from ``min_ratio`` to 1, then decays to ``min_ratio`` at the
    cycle's end: ``"linear"``, ``"cosine"`` or ``"constant"`` (stays at 1).
    """
    check_choice("decay", decay, DECAYS)
    min_ratio = check_fraction("min_ratio", min_ratio, closed_low=True, meaning="the multiplier at a cycle's end")
    total_steps = check_int("total_steps", total_steps)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    steps = {int(s) for s in prune_steps if 0 <= int(s) < total_steps}
    if not steps:
        raise PruningError(f"prune_steps={list(prune_steps)!r} has no step in [0, {total_steps}); give the pruning "
                           "steps of the sparsity schedule")
    starts = sorted(steps | {0})  # training before the first pruning step is a cycle of its own
    ends = starts[1:] + [total_steps]

    def multiplier(step: int) -> float:
        i = max(0, sum(1 for s in starts if s <= step) - 1)
        length = max(1, ends[i] - starts[i])
        t = min(max(step - starts[i], 0), length)
        warm = min(warmup_steps, length - 1)
        if t < warm:
            return min_ratio + (1.0 - min_ratio) * (t + 1) / (warm + 1)
        if decay == "constant":
            return 1.0
        p = (t - warm) / max(1, length - warm)
        shape = 1.0 - p if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return min_ratio + (1.0 - min_ratio) * shape

    return multiplier


def restart_lr_scheduler(optimizer: torch.optim.Optimizer, prune_steps: Sequence[int], total_steps: int, *,
                         decay: str = "linear", min_ratio: float = 0.0, warmup_steps: int = 0,
                         last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with :func:`restart_lr_lambda` (the optimizer's learning rate is the peak of every
    cycle); pass it to ``Trainer(optimizers=(optimizer, scheduler))`` or return it from a Trainer's
    ``create_scheduler``."""
    fn = restart_lr_lambda(prune_steps, total_steps, decay=decay, min_ratio=min_ratio, warmup_steps=warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=last_epoch)


# ----------------------------------------------------------------------------------------- distillation


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) to distil from, taken before pruning; it
    carries no weight masks (they live in the student's ``__dict__``, which the copy must not share)."""
    from ...sparse.masks import ATTR

    masks = model.__dict__.pop(ATTR, None)
    try:
        teacher = copy.deepcopy(model)
    finally:
        if masks is not None:
            model.__dict__[ATTR] = masks
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, alpha: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """``(1 − alpha) · CE(student, labels) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``,
    averaged over the batch (``alpha=1`` or ``labels=None``: distillation alone). The teacher's logits
    are detached."""
    alpha = check_fraction("alpha", alpha, closed_low=True, meaning="the weight of the distillation term")
    t = check_number("temperature", temperature, positive=True)
    if student_logits.shape != teacher_logits.shape:
        raise PruningError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ in shape")
    s = student_logits.float().reshape(-1, student_logits.shape[-1])
    q = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    kd = nn.functional.kl_div(nn.functional.log_softmax(s / t, dim=-1), nn.functional.log_softmax(q / t, dim=-1),
                              reduction="batchmean", log_target=True) * (t * t)
    if labels is None or alpha == 1.0:
        return kd
    ce = nn.functional.cross_entropy(s, labels.reshape(-1))
    return (1.0 - alpha) * ce + alpha * kd
