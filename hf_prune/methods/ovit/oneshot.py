"""One-shot oViT: block-wise OBS with a global threshold, through the transactional weight driver."""
from __future__ import annotations

import torch
from torch import nn

from ...core.distributed import comm_device, process_group
from ...errors import ConfigError
from ...sparse.distributed import broadcast_from_owners, check_same_batches, owned_layers, share_layers
from ...sparse.oneshot import prune_weights_with
from .config import OViTConfig
from .obs import ovit_prune


def partitioned_ovit(model: nn.Module, sparsity, calib, masks, **options) -> dict:
    """:func:`~hf_prune.methods.ovit.obs.ovit_prune` with the layers shared out across the ranks of the process
    group (:mod:`hf_prune.sparse.distributed`): each rank computes gradients, Fisher blocks and removals for
    its own layers only (so it holds about ``1/world`` of the Fisher information), the accumulated losses
    are exchanged for the global threshold, and every rank ends with every layer's masks and updated
    weights — the same result as one process pruning every layer. All ranks call it together, with the
    same ``calib`` (checked for lists). Plain :func:`ovit_prune` without a process group."""
    if process_group() is None:
        return ovit_prune(model, sparsity, calib, masks=masks, **options)
    if calib is not None:
        check_same_batches(calib)
    own, owner = owned_layers(masks)
    if options.get("grads") is not None:
        options["grads"] = {n: g for n, g in options["grads"].items() if n in own}
    stats = ovit_prune(model, sparsity, calib, masks=masks, layers=own,
                       exchange=lambda losses: broadcast_from_owners(losses, owner), **options)
    share_layers(masks, owner)
    total = torch.tensor([float(stats.get("predicted_loss", 0.0))], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(total)
    return {**stats, "predicted_loss": float(total)}


def prune_ovit(model: nn.Module, config: OViTConfig, *, example_inputs=None, calib=None, loss_fn=None,
               distributed: bool = False, **options) -> dict:
    """Prune ``model``'s weights in place with oViT; ``calib``: labelled batches for the gradients (or
    ``grads=`` precomputed). ``options`` go to :func:`~hf_prune.methods.ovit.obs.ovit_prune`
    (``grads``, ``info``, ``num_threads``, ``chunk_bytes``, ``grad_dtype``). ``distributed=True``: every
    rank of the process group calls this together and handles a share of the layers
    (:func:`partitioned_ovit`)."""
    if calib is None and options.get("grads") is None:
        raise ConfigError("method 'ovit' needs gradients of the loss: pass calib= (labelled batches: "
                          "{'pixel_values', 'labels'} dicts or (x, y) pairs)")
    opts = {**config.obs_options(), **options}
    run = partitioned_ovit if distributed else (lambda m, s, c, masks, **o: ovit_prune(m, s, c, masks=masks, **o))

    def select(m, masks, sparsity):
        return run(m, sparsity, calib, masks, loss_fn=loss_fn, **opts)

    return prune_weights_with(model, config, select, example_inputs=example_inputs)
