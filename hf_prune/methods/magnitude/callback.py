"""MagnitudeCallback: gradual magnitude weight pruning during training (the baseline of the weight methods)."""
from __future__ import annotations

from ...sparse.callback import WeightPruningCallback
from .config import MagnitudeConfig
from .oneshot import select_by_magnitude

__all__ = ["MagnitudeCallback"]


class MagnitudeCallback(WeightPruningCallback):
    """Magnitude pruning on a schedule (Zhu & Gupta's gradual pruning with the config's allocation)."""

    config_class = MagnitudeConfig

    def select(self, masks, sparsity: float) -> dict:
        nm = self.config.nm
        return select_by_magnitude(masks, sparsity, allocation=self.config.allocation, nm=nm)
