"""Magnitude weight pruning: the data-free baseline of the weight methods (global, uniform, LAMP, ERK).

:mod:`.config` (:class:`MagnitudeConfig`), :mod:`.oneshot` (:func:`prune_magnitude`), :mod:`.callback`
(:class:`MagnitudeCallback`). Masks and allocators are :mod:`hf_prune.sparse`'s.
"""
from ...registry import register_method
from .config import MagnitudeConfig

register_method("magnitude", MagnitudeConfig, f"{__name__}.oneshot:prune_magnitude",
                f"{__name__}.callback:MagnitudeCallback", kind="weights",
                paper="Zhu & Gupta 2017 (gradual); LAMP, ERK allocations", example={"sparsity": 0.5})

__all__ = ["MagnitudeConfig"]
