"""One-shot oViT: block-wise OBS with a global threshold, through the transactional weight driver."""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...sparse.oneshot import prune_weights_with
from .config import OViTConfig
from .obs import ovit_prune


def prune_ovit(model: nn.Module, config: OViTConfig, *, example_inputs=None, calib=None, loss_fn=None,
               **options) -> dict:
    """Prune ``model``'s weights in place with oViT; ``calib``: labelled batches for the gradients (or
    ``grads=`` precomputed). ``options`` go to :func:`~hf_prune.methods.ovit.obs.ovit_prune`
    (``grads``, ``info``, ``num_threads``, ``chunk_bytes``, ``grad_dtype``)."""
    if calib is None and options.get("grads") is None:
        raise ConfigError("method 'ovit' needs gradients of the loss: pass calib= (labelled batches: "
                          "{'pixel_values', 'labels'} dicts or (x, y) pairs)")
    opts = {**config.obs_options(), **options}

    def select(m, masks, sparsity):
        return ovit_prune(m, sparsity, calib, masks=masks, loss_fn=loss_fn, **opts)

    return prune_weights_with(model, config, select, example_inputs=example_inputs)
