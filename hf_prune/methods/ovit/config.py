"""Settings of oViT / CAP second-order weight pruning."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...core.checks import check_choice, check_int, check_number
from ...sparse.config import ALLOCATIONS, WeightPruningConfig

FISHER_MODES = ("auto", "gradients", "blocks")
FISHER_SOURCES = ("calib", "training")
DTYPES = ("float64", "float32")


@dataclass
class OViTConfig(WeightPruningConfig):
    """oViT / CAP (Kuznedelev et al., arXiv 2210.09223): OBS removal with weight updates from a block-wise
    empirical-Fisher inverse, and one global threshold on the OBS losses.

    ``block_size`` (B) and ``num_grads`` (m): the Fisher's block size and number of mini-batch gradients;
    ``damping`` (λ); ``fisher``: ``"gradients"`` (keep the m × d gradients), ``"blocks"`` (accumulate d × B
    blocks on the fly) or ``"auto"`` (the smaller); ``max_fisher_mb``: bound on the Fisher held at once
    (layers in groups, gradient passes repeated per group; ``"auto"``: 4 GiB, or the largest layer's
    Fisher; None: no bound); ``dtype``: of the Fisher blocks. Defaults B=128, m=256 are a departure
    from the paper's code (B=192, m up to 4096): on ViT-B/16 those need ~137 GiB of Fisher blocks,
    i.e. 36 groups of gradient passes within 4 GiB; B=128, m=256 lost 2 points less than B=64, m=64
    at 90% on real digits (benchmarks/ovit_defaults.py). With fewer calibration batches than
    ``num_grads``, every batch gives one gradient and none is repeated.
    ``allocation``: None = the paper's global OBS threshold, or an allocator name / ``{layer: sparsity}``.
    During training, ``fisher_source="calib"`` (default, as in the paper) computes the gradients on
    calibration data in eval mode at each pruning step; ``"training"`` uses the last ``num_grads``
    training gradients (train mode, after clipping).
    """

    method = "ovit"

    allocation: str | dict | None = None
    block_size: int = 128
    num_grads: int = 256
    damping: float = 1e-8
    fisher: str = "auto"
    max_fisher_mb: float | str | None = "auto"
    dtype: str = "float64"
    fisher_source: str = "calib"
    calib_batch_size: int = 1

    def validate(self) -> None:
        super().validate()
        if self.allocation is not None and not isinstance(self.allocation, Mapping):
            check_choice("allocation", self.allocation, ALLOCATIONS)
        check_int("block_size", self.block_size)
        check_int("num_grads", self.num_grads)
        check_number("damping", self.damping, positive=True)
        check_choice("fisher", self.fisher, FISHER_MODES)
        if self.max_fisher_mb not in (None, "auto"):
            check_number("max_fisher_mb", self.max_fisher_mb, positive=True, meaning="MiB, 'auto' or None")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("fisher_source", self.fisher_source, FISHER_SOURCES)

    def obs_options(self) -> dict:
        import torch

        return {"block_size": self.block_size, "num_grads": self.num_grads, "damping": self.damping,
                "fisher": self.fisher, "max_fisher_mb": self.max_fisher_mb, "dtype": getattr(torch, self.dtype),
                "nm": self.nm, "allocation": self.allocation}
