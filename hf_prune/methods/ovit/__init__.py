"""oViT / CAP (Kuznedelev et al., arXiv 2210.09223): second-order (OBS) weight pruning, unstructured or N:M.

:mod:`.config` (:class:`OViTConfig`), :mod:`.obs` (gradients, block-wise Fisher, OBS sweeps,
:func:`~.obs.ovit_prune`), :mod:`.oneshot` (:func:`prune_ovit`), :mod:`.callback` (:class:`OViTCallback`).
"""
from ...registry import register_method
from .config import OViTConfig

register_method("ovit", OViTConfig, f"{__name__}.oneshot:prune_ovit", f"{__name__}.callback:OViTCallback",
                kind="weights", paper="Kuznedelev et al., arXiv 2210.09223 (NeurIPS 2023)",
                example={"sparsity": 0.5, "block_size": 16, "num_grads": 8}, needs_calib=True)

__all__ = ["OViTConfig"]
