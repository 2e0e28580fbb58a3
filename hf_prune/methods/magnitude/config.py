"""Settings of magnitude weight pruning."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...core.checks import check_choice
from ...sparse.config import ALLOCATIONS, WeightPruningConfig


@dataclass
class MagnitudeConfig(WeightPruningConfig):
    """Magnitude weight pruning: the smallest ``|w|`` go, with a layer ``allocation``.

    ``allocation``: ``"global"`` (one threshold over all layers), ``"uniform"``, ``"lamp"`` (Lee et al.,
    ICLR 2021), ``"erk"`` (Evci et al., 2020), or ``{layer: sparsity}``. Other fields:
    :class:`~hf_prune.sparse.config.WeightPruningConfig`.
    """

    method = "magnitude"

    allocation: str | dict = "global"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.allocation, Mapping):
            check_choice("allocation", self.allocation, ALLOCATIONS)
