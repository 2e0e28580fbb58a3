"""DepGraph (Fang et al., CVPR 2023): structural pruning of coupled channel groups and attention heads.

:mod:`.config` (:class:`DepGraphConfig`), :mod:`.oneshot` (:func:`prune_depgraph`), :mod:`.callback`
(:class:`DepGraphCallback`, with the paper's sparse learning). The coupling itself is the engine's
(:mod:`hf_prune.engine`); this package decides what goes.
"""
from ...registry import register_method
from .config import DepGraphConfig

register_method("depgraph", DepGraphConfig, f"{__name__}.oneshot:prune_depgraph", f"{__name__}.callback:DepGraphCallback",
                kind="structured", paper="Fang et al., CVPR 2023, arXiv 2301.12093",
                example={"target_macs": 0.6})

__all__ = ["DepGraphConfig"]
