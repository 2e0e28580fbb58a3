"""One-shot RD: distortion curves and the dynamic program choose each layer's sparsity; magnitude inside."""
from __future__ import annotations

import torch
from torch import nn

from ...core.distributed import process_group
from ...errors import ConfigError
from ...sparse.distributed import check_same_batches, exchange_ragged, owned_layers
from ...sparse.oneshot import prune_weights_with
from .config import RDConfig
from .curves import RDCurves, allocate_rd, apply_rd_allocation, distortion_curves


def partitioned_curves(model: nn.Module, calib, masks, config: RDConfig) -> RDCurves:
    """The distortion curves of every masked layer, each rank measuring its share of the layers
    (:mod:`hf_prune.sparse.distributed`); identical on every rank, and equal to one process measuring all."""
    check_same_batches(calib)
    own, owner = owned_layers(masks)
    opts = {k: v for k, v in config.curve_options().items() if k != "max_states"}
    mine = distortion_curves(model, calib, layers=own, masks=masks, **opts) if own else None
    local = {n: torch.tensor(p + d, dtype=torch.float64)
             for n, p, d in zip(mine.names, mine.pruned, mine.distortion)} if mine else {}
    got = exchange_ragged(local, owner)
    halves = [(got[n][:got[n].numel() // 2], got[n][got[n].numel() // 2:]) for n in masks.layers]
    return RDCurves(names=masks.layers, sizes=[masks.weight(n).numel() for n in masks.layers],
                    pruned=[[int(k) for k in p.tolist()] for p, _ in halves],
                    distortion=[d.tolist() for _, d in halves],
                    reduction=config.reduction, seconds=mine.seconds if mine else 0.0,
                    forwards=mine.forwards if mine else 0, samples=mine.samples if mine else 0,
                    extra={"layers_measured_here": len(own)})


def select_rd(model: nn.Module, masks, sparsity: float, calib, config: RDConfig, *, distributed: bool = False,
              **options) -> dict:
    """Grow ``masks`` to ``sparsity`` with the RD allocation measured on ``calib``.

    ``distributed=True`` (all ranks call it together, with the same ``calib``): the curves are measured by
    layer share across the ranks of the process group (:func:`partitioned_curves`); with ``rounds > 1``
    every rank measures every round's curves (they depend on the previous round's pruning)."""
    if distributed and process_group() is not None and options.get("curves") is None \
            and options.get("rounds", 1) == 1:
        options["curves"] = partitioned_curves(model, calib, masks, config)
    targets = allocate_rd(model, sparsity, calib, masks=masks, **config.curve_options(), **options)
    apply_rd_allocation(masks, targets, min_per_row=config.min_per_row)
    return {"allocation": "rd"}


def prune_rd(model: nn.Module, config: RDConfig, *, example_inputs=None, calib=None, **options) -> dict:
    """Prune ``model``'s weights in place with RD on ``calib``; ``options`` go to
    :func:`~hf_prune.methods.rd.curves.allocate_rd` (``curves=``, ``info=``, ``unit=``, ...), except
    ``distributed=True``: every rank of the process group calls this together and measures a share of
    the curves (:func:`select_rd`)."""
    if calib is None:
        raise ConfigError("method 'rd' measures distortion curves: pass calib= (a list of "
                          "{'pixel_values': ...} dicts, (x, y) pairs or tensors)")
    options.setdefault("rounds", config.rounds)  # in training, the rounds are the schedule's pruning steps
    return prune_weights_with(model, config, lambda m, masks, s: select_rd(m, masks, s, calib, config, **options),
                              example_inputs=example_inputs)
