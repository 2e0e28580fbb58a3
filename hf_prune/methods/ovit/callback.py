"""OViTCallback: oViT's gradual pruning during training (cubic schedule with fine-tuning between steps)."""
from __future__ import annotations

import torch

from ...core.distributed import full_value
from ...sparse.callback import WeightPruningCallback
from ...sparse.distributed import owned_layers
from .config import OViTConfig
from .oneshot import partitioned_ovit

__all__ = ["OViTCallback"]


class OViTCallback(WeightPruningCallback):
    """oViT during ``Trainer.train()``: the paper's recipe is a cubic schedule (e.g. ``initial=0.4,
    sparsity=0.75``) with fine-tuning between pruning steps; masks only grow and are re-applied after every
    optimizer step.

    Gradients for the Fisher (``config.fisher_source``): ``"calib"`` (default, as in the paper) —
    ``num_grads`` mini-batch gradients on calibration data (``calib=`` or the first ``calib_size``
    training items) in eval mode at each pruning step; ``"training"`` — the last ``num_grads`` training
    gradients before each pruning step, captured after clipping and DDP averaging (train mode; a pruning
    step waits until ``num_grads`` were seen, except at the schedule's last step). That buffer holds
    ``num_grads × prunable weights`` floats only in the window before a pruning step.

    Distributed (DDP or FSDP2): every rank computes gradients, Fisher blocks and removals for its own share
    of the layers only, and keeps training gradients only for those (:func:`~hf_prune.methods.ovit.oneshot.
    partitioned_ovit`); sharded gradients are gathered layer by layer.
    """

    config_class = OViTConfig

    def _reset(self) -> None:
        super()._reset()
        self._grads: dict | None = None
        self._grad_count = 0
        self._prune_steps: list[int] | None = None

    def _training_grads(self) -> bool:
        return self.config.fisher_source == "training"

    def ready_to_prune(self) -> bool:
        if not self._training_grads():
            return True
        end = self.schedule.steps(self.total_steps)[1]
        return self._grad_count >= self.config.num_grads or (self._grad_count > 0 and self.step >= end)

    def _in_window(self) -> bool:
        if self.pending:
            return True
        if self._prune_steps is None:
            self._prune_steps = self.schedule.pruning_steps(self.total_steps)
        return any(0 < p - self.step <= self.config.num_grads for p in self._prune_steps)

    @torch.no_grad()
    def gradients(self) -> None:
        if not self._training_grads() or not self._in_window():
            return
        m = self.config.num_grads
        modules = dict(self.trained_model.named_modules())  # gradients live on the trained model (sharded or not)
        weights = {n: modules[n].weight for n in self.masks.layers}
        if any(w.grad is None for w in weights.values()):
            return
        own = set(owned_layers(self.masks)[0])
        if self._grads is None:
            self._grads = {n: torch.zeros((m, self.masks.weight(n).numel()), dtype=torch.float32)
                           for n in self.masks.layers if n in own}
            self._grad_count = 0
        slot = self._grad_count % m
        for n, w in weights.items():
            grad = full_value(w.grad)  # every rank, every layer: gathering a sharded gradient is collective
            if n in own:
                self._grads[n][slot].copy_((grad * self.masks[n].to(grad.device, grad.dtype)).reshape(-1))
        self._grad_count += 1

    def select(self, masks, sparsity: float) -> dict:
        opts = self.config.obs_options()
        if self.config.nm is not None:  # N:M is all-or-nothing: any pruning step applies the full pattern
            sparsity = None
        calib = None
        if self._training_grads():
            k = min(self._grad_count, self.config.num_grads)
            opts["grads"] = {n: g[:k] for n, g in self._grads.items()}
        else:
            calib = self.calibration()
        try:
            return partitioned_ovit(self.model, sparsity, calib, masks, **opts)
        finally:
            self._grads, self._grad_count = None, 0
