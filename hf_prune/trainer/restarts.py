"""Learning-rate restarts at every pruning step (oViT's cyclic schedule): :class:`LRRestartsCallback`.

oViT (Kuznedelev et al., arXiv 2210.09223) fine-tunes between pruning steps with a learning rate that
goes back to its peak right after each pruning step and decays until the next one, then decays once
more over the final fine-tuning (:func:`hf_prune.core.schedules.restart_lr_lambda`). A pruning
callback knows its pruning steps only once training starts (they depend on the number of steps), so
the restarts are installed by a callback too: it rewrites the multiplier of the Trainer's own
``LambdaLR`` scheduler (every ``lr_scheduler_type`` transformers builds from a lambda: linear, cosine,
constant, ...) at the first step. A resumed run installs it again and continues at the saved step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from ..core.schedules import restart_lr_lambda
from ..errors import ConfigError

__all__ = ["LRRestartsCallback", "restart_lr_scheduler"]


def restart_lr_scheduler(optimizer: torch.optim.Optimizer, prune_steps: Sequence[int], total_steps: int, *,
                         decay: str = "linear", min_ratio: float = 0.0, warmup_steps: int = 0,
                         last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with :func:`~hf_prune.core.schedules.restart_lr_lambda` (the optimizer's learning
    rate is the peak of every cycle), for plain training loops."""
    fn = restart_lr_lambda(prune_steps, total_steps, decay=decay, min_ratio=min_ratio, warmup_steps=warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=last_epoch)


class LRRestartsCallback(TrainerCallback):
    """Restart the learning rate at every pruning step of ``pruning`` (a callback with a sparsity schedule:
    DepGraph, RD, oViT, magnitude)::

        pruning = hf_prune.OViTCallback(sparsity=0.75, initial=0.4, frequency=200)
        Trainer(..., callbacks=[pruning, LRRestartsCallback(pruning)])

    decay: ``"linear"``, ``"cosine"`` or ``"constant"`` within each cycle; min_ratio: the multiplier at
    a cycle's end; warmup_steps: a short warm-up at the start of each cycle. The Trainer's scheduler must
    be a ``LambdaLR`` (the default for every ``lr_scheduler_type`` except ``reduce_lr_on_plateau``).
    """

    def __init__(self, pruning, *, decay: str = "linear", min_ratio: float = 0.0, warmup_steps: int = 0):
        from .callback import ScheduledPruningCallback

        if not isinstance(pruning, ScheduledPruningCallback):
            raise ConfigError(f"LRRestartsCallback restarts at the pruning steps of a sparsity schedule; "
                              f"{type(pruning).__name__} has none (use DepGraph, RD, oViT or magnitude callbacks)")
        restart_lr_lambda([0], 1, decay=decay, min_ratio=min_ratio, warmup_steps=warmup_steps)  # validates
        self.pruning = pruning
        self.decay, self.min_ratio, self.warmup_steps = decay, min_ratio, warmup_steps
        self.prune_steps: list[int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.prune_steps = None  # the pruning callback resolves its schedule in its own on_train_begin

    def on_step_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if self.prune_steps is not None:
            return
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ConfigError(f"LRRestartsCallback rewrites a LambdaLR scheduler, but the Trainer uses "
                              f"{type(lr_scheduler).__name__}; use another lr_scheduler_type (linear, cosine, constant)")
        total = state.max_steps
        self.prune_steps = self.pruning.schedule.pruning_steps(total)
        fn = restart_lr_lambda(self.prune_steps, total, decay=self.decay, min_ratio=self.min_ratio,
                               warmup_steps=self.warmup_steps)
        lr_scheduler.lr_lambdas = [fn] * len(lr_scheduler.optimizer.param_groups)
        step = lr_scheduler.last_epoch  # the current step (restored on resume)
        for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
            group["lr"] = base * fn(step)
        # get_last_lr() (what the Trainer logs) reads this cache; LambdaLR offers no public way to refresh it
        lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]

