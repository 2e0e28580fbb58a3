"""WeightPruningCallback: gradual unstructured pruning during training, shared by the weight methods.

Masks are :class:`~hf_prune.sparse.masks.WeightMasks` on the prunable Conv/Linear weights: they only
grow on the schedule (:class:`~hf_prune.trainer.callback.ScheduledPruningCallback`), are re-applied after
every optimizer step and are checkpointed as JSON (run-length / bitmap form). Nothing is compacted at the
end (unstructured sparsity keeps shapes); the zeros stay in the weights and the spec records them.
In distributed runs the masks *and the pruned layers' weights* (OBS updates them) are broadcast from
rank 0 after every pruning step, so every replica holds the same model. With sharded (FSDP2) parameters
the selection runs on the full-shape copy, refreshed from the shards first; the masks are kept whole on
every rank and each rank applies its slice of them to its shards (:func:`~hf_prune.core.distributed.multiply_`).

A method's callback subclasses this and implements ``select(masks, sparsity)`` — the same selection its
one-shot uses — with ``self.calibration()`` for its data.
"""
from __future__ import annotations

from torch import nn

from ..core.distributed import broadcast_, multiply_
from ..errors import PruningError
from ..trainer.callback import ScheduledPruningCallback
from ..trainer.state import calib_from_dataloader
from .masks import get_weight_masks
from .oneshot import masks_for

__all__ = ["WeightPruningCallback"]


class WeightPruningCallback(ScheduledPruningCallback):
    """Base of the weight-pruning callbacks. ``calib=`` (batches with labels) overrides the default
    calibration data (the first ``config.calib_size`` training items). ``stats()`` reports
    ``macs_ratio`` 1.0: dense kernels do the same work on zeros."""

    needs_example_inputs = False  # inputs only make the stem detection exact
    target_kind = "sparsity"

    def __init__(self, config=None, *, calib=None, example_inputs=None, **fields):
        super().__init__(config, example_inputs=example_inputs, **fields)
        self.calib = calib

    def _reset(self) -> None:
        super()._reset()
        self.masks = None

    def select(self, masks, sparsity: float) -> dict:
        raise NotImplementedError

    def calibration(self):
        """``calib=`` if given, else the first ``calib_size`` training items in batches."""
        if self.calib is not None:
            return self.calib
        if self.train_dataloader is None:
            raise PruningError(f"{type(self).__name__} needs calibration data: pass calib= (plain loops) or "
                               "train with a Trainer (the first training items are used)")
        self.calib = calib_from_dataloader(self.train_dataloader, self.config.calib_size,
                                           self.config.calib_batch_size)
        return self.calib

    # ------------------------------------------------------------------ protocol
    def prepare(self, model: nn.Module, example_inputs) -> None:
        self.masks, _ = masks_for(model, self.config, example_inputs)
        self.masks.attach(model)

    def prune_to(self, step: int, target: dict) -> bool:
        sparsity = float(target["sparsity"])
        before = self.masks.stats()["num_pruned"]
        self.refresh()  # sharded: the selection reads the current weights
        try:
            self.select(self.masks, sparsity)
        except PruningError as exc:
            raise PruningError(f"{type(self).__name__}: pruning at step {step} to sparsity={sparsity:.4f} "
                               f"failed: {exc}") from exc
        broadcast_([self.masks[n] for n in self.masks.layers] + [self.masks.weight(n) for n in self.masks.layers])
        self.masks.enforce()
        self.publish([f"{n}.weight" for n in self.masks.layers])  # sharded: OBS-updated weights reach the shards
        return self.masks.stats()["num_pruned"] != before

    def enforce(self) -> None:
        if not self.sharded:
            self.masks.enforce()
            return
        modules = dict(self.trained_model.named_modules())
        for n in self.masks.layers:
            multiply_(modules[n].weight, self.masks[n])

    def counts(self) -> dict:
        s = self.masks.stats()
        total = sum(p.numel() for p in self.model.parameters())
        return {"sparsity": s["global_sparsity"], "macs_ratio": 1.0,
                "params_ratio": (total - s["num_pruned"]) / max(total, 1), "num_pruned": s["num_pruned"],
                "num_weights": s["num_weights"]}

    def finalize(self) -> dict:
        self.masks.enforce()
        self.final_stats = self.counts()
        return self.masks.stats()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weight_masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict, tensors: dict | None = None) -> None:
        super().load_state_dict(state, tensors)
        self.masks.load_state_dict(state["weight_masks"])
        self.masks.enforce()
        if self.sharded:
            self.enforce()
        if get_weight_masks(self.model) is not self.masks:
            self.masks.attach(self.model)
