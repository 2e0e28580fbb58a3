"""Settings of RD layer-adaptive weight pruning."""
from __future__ import annotations

from dataclasses import dataclass

from ...core.checks import check_choice, check_fraction, check_int
from ...errors import ConfigError
from ...sparse.config import WeightPruningConfig

REDUCTIONS = ("max", "mean")


@dataclass
class RDConfig(WeightPruningConfig):
    """RD (Xu et al., ICCV 2023): per-layer sparsities from output-distortion curves, by dynamic programming.

    ``grid``: sparsity points per curve (evenly spaced on ``[0, max_sparsity]``); ``reduction``: distortion
    over the calibration samples, ``"max"`` (worst case, as in the authors' runs) or ``"mean"``;
    ``max_batches``: calibration batches used for the curves (default 16: every curve point runs all of
    them, and the paper used 256 ImageNet / 1,024 CIFAR images; None: all of ``calib``); ``max_states``:
    budget columns of the DP table (its quantisation). ``min_per_row``: weights every output unit of a
    layer keeps (default 2; 0 is the paper's uncapped grid, which at high sparsity can empty output
    units or whole layers, a departure noted in the README); ``rounds``: the paper's iterative schedule,
    ``k`` pruning rounds to targets ``1 − (1 − a)^t`` with the curves re-measured on the pruned model
    before each. One-shot (default 1): the rounds run back to back without fine-tuning. In training,
    ``schedule="geometric"`` makes the rounds pruning steps spread from ``start`` to ``end`` with
    fine-tuning between them, as in the paper (``RDCallback(sparsity=0.9, schedule="geometric",
    rounds=5)``). Calibration data (``calib=``) are required. Other fields:
    :class:`~hf_prune.sparse.config.WeightPruningConfig`.
    """

    method = "rd"

    grid: int = 21
    reduction: str = "max"
    max_sparsity: float = 1.0
    max_batches: int | None = 16
    max_states: int = 131072
    min_per_row: int = 2
    rounds: int = 1

    def validate(self) -> None:
        super().validate()
        if self.nm is not None:
            raise ConfigError("RD allocates a sparsity per layer; nm= patterns are method 'magnitude' or 'ovit'")
        check_int("grid", self.grid, minimum=2, meaning="sparsity points per distortion curve")
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_fraction("max_sparsity", self.max_sparsity, meaning="the largest sparsity any one layer may get")
        if self.max_batches is not None:
            check_int("max_batches", self.max_batches)
        check_int("max_states", self.max_states)
        check_int("min_per_row", self.min_per_row, minimum=0, meaning="weights every output unit keeps")
        check_int("rounds", self.rounds, meaning="pruning rounds of the iterative schedule")

    def curve_options(self) -> dict:
        return {"grid": self.grid, "reduction": self.reduction, "max_sparsity": self.max_sparsity,
                "max_batches": self.max_batches, "max_states": self.max_states, "min_per_row": self.min_per_row}

    def schedule_options(self) -> dict:
        return {"rounds": self.rounds} if self.schedule == "geometric" else {}
