"""The transactional driver every weight-pruning method's one-shot goes through.

A method supplies ``select(model, masks, sparsity) -> dict``, which grows the
:class:`~hf_prune.sparse.masks.WeightMasks` (and may update weights, as OBS does); this module finds the
layers, attaches the masks, zeroes the pruned weights and returns the statistics. On any exception
(``KeyboardInterrupt`` included) the weights and masks are restored and the exception re-raised.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PruningError
from .masks import WeightMasks, get_weight_masks


def masks_for(model: nn.Module, config, example_inputs=None) -> tuple[WeightMasks, bool]:
    """The model's attached masks (calling again only grows them), or new ones on the config's layers."""
    existing = get_weight_masks(model)
    if existing is not None:
        if config.layers is not None and list(config.layers) != existing.layers:
            raise PruningError("the model already carries weight masks on other layers; call "
                               "WeightMasks.detach(model) first or pass the same layers")
        return existing, False
    masks = WeightMasks.for_model(model, layers=list(config.layers) if config.layers is not None else None,
                                  exclude_stem=config.exclude_stem, exclude_classifier=config.exclude_classifier,
                                  exclude=config.exclude, example_inputs=example_inputs)
    return masks, True


def prune_weights_with(model: nn.Module, config, select, *, example_inputs=None) -> dict:
    """Run ``select(model, masks, config.sparsity)`` transactionally; returns the mask stats plus
    whatever ``select`` returned (e.g. ``allocation``)."""
    masks, fresh = masks_for(model, config, example_inputs)
    saved_w = {n: masks.weight(n).detach().clone() for n in masks.layers}
    saved_m = {n: m.clone() for n, m in masks.masks.items()}
    try:
        extra = select(model, masks, config.sparsity) or {}
        masks.enforce()
        masks.attach(model)
    except BaseException:
        with torch.no_grad():
            for n, w in saved_w.items():
                masks.weight(n).copy_(w)
        masks.masks = saved_m
        if fresh:
            WeightMasks.detach(model)
        raise
    stats = masks.stats()
    stats.update(extra)
    return stats
