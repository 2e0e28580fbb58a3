"""Settings of DepGraph structural pruning (one-shot and during training)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import ScheduleConfig
from ...core.checks import (check_choice, check_fraction, check_names, check_number, check_round_to, check_sparsity)
from ...errors import ConfigError

IMPORTANCES = ("l2", "l1", "taylor")
MODES = ("global", "local")
SPARSE_PENALTIES = ("squared", "lasso")
SYNC_MODES = ("all_reduce", "broadcast")  # how scores agree across processes (core.distributed.sync_scores)


@dataclass
class DepGraphConfig(ScheduleConfig):
    """DepGraph (Fang et al., CVPR 2023): coupled channel groups and attention heads.

    Targets (exactly one): ``target_macs`` (fraction of the dense MACs to keep, (0, 1]) or ``sparsity``
    (fraction of the prunable parameters to remove, [0, 1)).
    ``importance``: ``"l2"`` / ``"l1"`` group magnitude, ``"taylor"`` (first order ``|w·∂L/∂w|``; one-shot
    needs ``calib=``). ``mode``: ``"global"`` ranks all units by group-normalised importance, ``"local"``
    removes the same fraction of every group. ``round_to``: channel groups keep a multiple of it (None:
    no rounding). ``prune_stem``: also prune the stem's output channels (a ViT's embedding width).
    ``ignored_layers``: module names whose output channels stay.
    Training only: the schedule fields (:class:`~hf_prune.config.ScheduleConfig`), ``compact_at_end``,
    ``sync`` (``"all_reduce"`` / ``"broadcast"``: how scores agree across processes), and the paper's
    sparse learning: ``group_sparsity`` (λ; 0 disables), ``sparse_alpha`` (α: the least important unit
    of a group is penalised ``2^α`` times as much as the most important), ``sparse_penalty``
    (``"squared"``: the paper's ``λ Σ_k γ_k ||w_k||²``; ``"lasso"``: ``λ Σ_k γ_k ||w_k||₂``, ours); see
    :class:`~hf_prune.methods.depgraph.callback.DepGraphCallback`.
    """

    method = "depgraph"

    target_macs: float | None = None
    sparsity: float | None = None
    importance: str = "l2"
    mode: str = "global"
    round_to: int | None = 8
    prune_stem: bool = False
    ignored_layers: tuple = ()
    compact_at_end: bool = True
    sync: str = "all_reduce"
    group_sparsity: float = 0.0
    sparse_alpha: float = 4.0
    sparse_penalty: str = "squared"

    def validate(self) -> None:
        if (self.target_macs is None) == (self.sparsity is None):
            raise ConfigError("give exactly one of target_macs= (fraction of dense MACs to keep, e.g. 0.5) or "
                              f"sparsity= (fraction of prunable parameters to remove, e.g. 0.3); got "
                              f"target_macs={self.target_macs!r}, sparsity={self.sparsity!r}")
        if self.target_macs is not None:
            check_fraction("target_macs", self.target_macs)
        else:
            check_sparsity(self.sparsity)
        check_choice("importance", self.importance, IMPORTANCES)
        check_choice("mode", self.mode, MODES)
        check_round_to(self.round_to)
        self.ignored_layers = check_names("ignored_layers", self.ignored_layers)
        check_choice("sync", self.sync, SYNC_MODES)
        check_number("group_sparsity", self.group_sparsity, minimum=0,
                     meaning="the regularisation strength λ; 0 disables sparse learning")
        check_number("sparse_alpha", self.sparse_alpha, minimum=0)
        check_choice("sparse_penalty", self.sparse_penalty, SPARSE_PENALTIES)
        self.make_schedule(self.target_kind)

    @property
    def target_kind(self) -> str:
        return "target_macs" if self.target_macs is not None else "sparsity"
