"""Settings of UPDP depth pruning (one-shot and progressive)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import PruningConfig
from ...core.checks import check_choice, check_fraction, check_int, check_position
from ...errors import ConfigError

ANNEAL_SHAPES = ("linear", "cosine")


@dataclass
class UPDPConfig(PruningConfig):
    """UPDP (Liu et al., AAAI 2024): whole blocks anneal to a linear form and are merged exactly.

    Which blocks (at most one): ``num_blocks`` (the k whose removal changes the output least),
    ``blocks`` (indices into :func:`~hf_prune.methods.updp.depth.find_blocks`, or module paths) or
    ``target_macs`` (fraction of dense MACs to keep; blocks chosen greedily by output change per MAC);
    none: a quarter of the candidate blocks.
    Training: λ rises from 0 at ``anneal_start`` to 1 at ``anneal_end`` (fractions of training or
    optimizer steps) with the ``schedule`` shape (``"linear"`` / ``"cosine"``); ``merge_at_end`` merges
    when training ends. ``end_act``: add an activation after the residual sum of a pruned block (the
    paper's "BN + activation kept at the end"); None = yes when training progressively, no in one-shot
    pruning (which cannot train it). ``recalibrate``: one-shot re-estimates BatchNorm statistics at λ = 1.
    """

    method = "updp"

    num_blocks: int | None = None
    blocks: tuple | None = None
    target_macs: float | None = None
    anneal_start: float = 0.0
    anneal_end: float = 0.8
    schedule: str = "linear"
    end_act: bool | None = None
    merge_at_end: bool = True
    recalibrate: bool = True

    def validate(self) -> None:
        if sum(v is not None for v in (self.num_blocks, self.blocks, self.target_macs)) > 1:
            raise ConfigError("give at most one of num_blocks=, blocks= and target_macs= (which blocks UPDP merges)")
        if self.num_blocks is not None:
            check_int("num_blocks", self.num_blocks, meaning="blocks to merge")
        if self.target_macs is not None:
            check_fraction("target_macs", self.target_macs)
        if self.blocks is not None and (isinstance(self.blocks, (str, int)) or not len(self.blocks)):
            raise ConfigError(f"blocks={self.blocks!r} must be a non-empty list of block indices or module paths")
        check_position("anneal_start", self.anneal_start)
        check_position("anneal_end", self.anneal_end)
        if type(self.anneal_start) is type(self.anneal_end) and self.anneal_end < self.anneal_start:
            raise ConfigError(f"anneal_end={self.anneal_end} is before anneal_start={self.anneal_start}")
        check_choice("schedule", self.schedule, ANNEAL_SHAPES)
