"""RDCallback: RD layer-adaptive weight pruning during training."""
from __future__ import annotations

from ...sparse.callback import WeightPruningCallback
from .config import RDConfig
from .oneshot import select_rd

__all__ = ["RDCallback"]


class RDCallback(WeightPruningCallback):
    """RD during ``Trainer.train()``: at every pruning step of the schedule the distortion curves are
    re-measured on the current (masked, fine-tuned) model, starting at each layer's current sparsity,
    the DP re-solved for the scheduled sparsity, and the magnitude masks grown to it. Calibration data
    (``calib=`` or the first ``calib_size`` training items) should be small: each pruning step costs
    ``layers × grid`` forward passes of it.
    """

    config_class = RDConfig

    def select(self, masks, sparsity: float) -> dict:
        # every rank runs the callback: the curves are measured by layer share (hf_prune.sparse.distributed)
        return select_rd(self.model, masks, sparsity, self.calibration(), self.config, distributed=True)
