"""One-shot magnitude weight pruning: a layer allocation, then the smallest weights of each layer."""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ...sparse.allocation import allocate
from ...sparse.masks import select_magnitude, select_nm
from ...sparse.oneshot import prune_weights_with
from .config import MagnitudeConfig


def select_by_magnitude(masks, sparsity: float, *, allocation="global", nm=None) -> dict:
    """Grow ``masks`` to ``sparsity`` by magnitude with ``allocation`` (or to the ``nm`` pattern)."""
    if nm is not None:
        for n in masks.layers:
            masks.set(n, select_nm(masks.weight(n), nm[0], nm[1], keep=masks[n]))
        return {"allocation": f"{nm[0]}:{nm[1]}"}
    if isinstance(allocation, Mapping):
        targets, name = dict(allocation), "explicit"
    else:
        targets, name = allocate(allocation, {n: masks.weight(n) for n in masks.layers}, sparsity,
                                 keep=masks.masks), allocation
    for n in masks.layers:
        masks.set(n, select_magnitude(masks.weight(n), targets.get(n, 0.0), keep=masks[n]))
    return {"allocation": name}


def prune_magnitude(model: nn.Module, config: MagnitudeConfig, *, example_inputs=None, calib=None) -> dict:
    """Prune ``model``'s weights in place (``calib`` is not needed); returns the mask stats."""
    return prune_weights_with(model, config, lambda m, masks, s: select_by_magnitude(
        masks, s, allocation=config.allocation, nm=config.nm), example_inputs=example_inputs)
