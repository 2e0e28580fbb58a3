"""Settings of DepGraph structural pruning (one-shot and during training)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import ScheduleConfig
from ...core.checks import (MEASURED, check_choice, check_fraction, check_int, check_names, check_number,
                            check_round_to, check_sparsity)
from ...errors import ConfigError

RECONSTRUCT_LAYERS = ("consumers", "all")  # the named forms of reconstruct(layers=)

IMPORTANCES = ("l2", "l1", "taylor", "activation")
MODES = ("global", "local")
SPARSE_PENALTIES = ("squared", "squared_decoupled", "lasso")
TARGETS = ("target_macs", "sparsity", "target_latency")
LATENCY_DTYPES = ("float32", "float16", "bfloat16", "float64")
SYNC_MODES = ("all_reduce", "broadcast")  # how scores agree across processes (core.distributed.sync_scores)


@dataclass
class DepGraphConfig(ScheduleConfig):
    """DepGraph (Fang et al., CVPR 2023): coupled channel groups and attention heads.

    Targets (exactly one): ``target_macs`` (fraction of the dense MACs to keep, (0, 1]), ``sparsity``
    (fraction of the prunable parameters to remove, [0, 1)) or ``target_latency`` (fraction of the dense
    model's *measured* latency to keep, (0, 1]: a latency model of every layer at a grid of widths is
    measured on ``latency_device`` at ``latency_batch_size`` in ``latency_dtype`` — defaults: the model's
    device, 1, its dtype — cached on disk, and the plan is verified by timing; see
    :mod:`hf_prune.engine.latency`).
    ``importance``: ``"l2"`` / ``"l1"`` group magnitude, ``"taylor"`` (first order ``|w·∂L/∂w|``; one-shot
    needs ``calib=``), ``"activation"`` (one-shot with ``calib=`` only: how much removing a unit disturbs
    the outputs of the layers that read it, :func:`~hf_prune.engine.importance.activation_scores`; on a
    pretrained EfficientNet-Lite1 it beat ``"l2"`` with reconstruction, on Lite2 it lost, and its plans ran
    slower at the same MACs).
    ``reconstruct`` (one-shot): re-fit the layers that read pruned channels by ridge least squares so their
    outputs match the dense model's on ``calib``, then correct the BatchNorm means downstream
    (:func:`~hf_prune.engine.reconstruct.reconstruct`); None (default) = on when ``calib=`` is given.
    ``reconstruct_layers``: ``"consumers"`` (default: the layers that read pruned channels) or ``"all"``
    (every Conv/Linear after the first pruned one, about twice the time; on pretrained EfficientNet-Lite at
    70% of the MACs it raised agreement with the dense model, at 90% it lowered it).
    ``mode``: ``"global"`` ranks all units by group-normalised importance, ``"local"`` removes the same
    fraction of every group. ``round_to``: channel groups keep a multiple of it (None:
    no rounding; ``"measured"`` with ``target_latency``: the fastest nearby width by timing). ``prune_stem``: also prune the stem's output channels (a ViT's embedding width).
    ``ignored_layers``: module names whose output channels stay.
    Training only: the schedule fields (:class:`~hf_prune.config.ScheduleConfig`), ``compact_at_end``,
    ``sync`` (``"all_reduce"`` / ``"broadcast"``: how scores agree across processes), and the paper's
    sparse learning: ``group_sparsity`` (λ; 0 disables), ``sparse_alpha`` (α: the least important unit
    of a group is penalised ``2^α`` times as much as the most important), ``sparse_penalty``
    (``"squared"``: the paper's ``λ Σ_k γ_k ||w_k||²``, added to the gradients; ``"squared_decoupled"``:
    the same penalty applied as a shrink of the weights by ``1 − lr·2λγ_k``, like AdamW's weight decay,
    for Adam-type optimizers; ``"lasso"``: ``λ Σ_k γ_k ||w_k||₂``, ours); see
    :class:`~hf_prune.methods.depgraph.callback.DepGraphCallback`.
    """

    method = "depgraph"

    target_macs: float | None = None
    sparsity: float | None = None
    target_latency: float | None = None
    latency_device: str | None = None
    latency_batch_size: int = 1
    latency_dtype: str | None = None
    importance: str = "l2"
    reconstruct: bool | None = None
    reconstruct_layers: str = "consumers"
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
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of target_macs= (fraction of dense MACs to keep, e.g. 0.5), "
                              "sparsity= (fraction of prunable parameters to remove, e.g. 0.3) or target_latency= "
                              "(fraction of the dense measured latency to keep); got "
                              + ", ".join(f"{k}={getattr(self, k)!r}" for k in TARGETS))
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        else:
            check_fraction(given[0], getattr(self, given[0]))
        check_int("latency_batch_size", self.latency_batch_size)
        if self.latency_dtype is not None:
            check_choice("latency_dtype", self.latency_dtype, LATENCY_DTYPES)
        if self.round_to == MEASURED and self.target_latency is None:
            raise ConfigError(f"round_to={MEASURED!r} picks widths by timing them, so it needs target_latency=")
        check_choice("importance", self.importance, IMPORTANCES)
        if self.reconstruct not in (None, True, False):
            raise ConfigError(f"reconstruct={self.reconstruct!r} must be True, False or None (on when calib= is given)")
        check_choice("reconstruct_layers", self.reconstruct_layers, RECONSTRUCT_LAYERS)
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
        return next(k for k in TARGETS if getattr(self, k) is not None)

    def latency_options(self) -> dict:
        """How the latency target is measured (the engine's ``latency_*`` arguments)."""
        import torch

        return {"latency_device": self.latency_device, "latency_batch_size": self.latency_batch_size,
                "latency_dtype": getattr(torch, self.latency_dtype) if self.latency_dtype else None}
