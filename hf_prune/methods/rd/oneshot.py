"""One-shot RD: distortion curves and the dynamic program choose each layer's sparsity; magnitude inside."""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...sparse.masks import select_magnitude
from ...sparse.oneshot import prune_weights_with
from .config import RDConfig
from .curves import allocate_rd


def select_rd(model: nn.Module, masks, sparsity: float, calib, config: RDConfig, **options) -> dict:
    """Grow ``masks`` to ``sparsity`` with the RD allocation measured on ``calib``."""
    targets = allocate_rd(model, sparsity, calib, masks=masks, **config.curve_options(), **options)
    for n in masks.layers:
        masks.set(n, select_magnitude(masks.weight(n), targets.get(n, 0.0), keep=masks[n]))
    return {"allocation": "rd"}


def prune_rd(model: nn.Module, config: RDConfig, *, example_inputs=None, calib=None, **options) -> dict:
    """Prune ``model``'s weights in place with RD on ``calib``; ``options`` go to
    :func:`~hf_prune.methods.rd.curves.allocate_rd` (``curves=``, ``info=``, ``unit=``, ...)."""
    if calib is None:
        raise ConfigError("method 'rd' measures distortion curves: pass calib= (a list of "
                          "{'pixel_values': ...} dicts, (x, y) pairs or tensors)")
    return prune_weights_with(model, config, lambda m, masks, s: select_rd(m, masks, s, calib, config, **options),
                              example_inputs=example_inputs)
