"""UPDP (Liu et al., AAAI 2024, arXiv 2401.06426): progressive depth pruning with exact block merging.

:mod:`.config` (:class:`UPDPConfig`), :mod:`.blocks` (annealed block forms per family), :mod:`.merge`
(exact re-parameterisation), :mod:`.depth` (finding, scoring, annealing and merging blocks),
:mod:`.search` (depth supernet and subnet search, stages 1–2 of the paper), :mod:`.oneshot`
(:func:`prune_updp`), :mod:`.callback` (:class:`UPDPCallback`, :class:`UPDPSupernetCallback`).
"""
from ...registry import register_method
from .config import UPDPConfig

register_method("updp", UPDPConfig, f"{__name__}.oneshot:prune_updp", f"{__name__}.callback:UPDPCallback",
                kind="depth", paper="Liu et al., AAAI 2024, arXiv 2401.06426", example={"num_blocks": 1})

__all__ = ["UPDPConfig"]
