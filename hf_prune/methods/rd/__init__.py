"""RD (Xu et al., ICCV 2023, arXiv 2308.10438): layer-adaptive weight pruning by rate-distortion.

:mod:`.config` (:class:`RDConfig`), :mod:`.curves` (distortion curves, the dynamic program,
:func:`~.curves.allocate_rd`), :mod:`.oneshot` (:func:`prune_rd`), :mod:`.callback` (:class:`RDCallback`).
"""
from ...registry import register_method
from .config import RDConfig

register_method("rd", RDConfig, f"{__name__}.oneshot:prune_rd", f"{__name__}.callback:RDCallback", kind="weights",
                paper="Xu et al., ICCV 2023, arXiv 2308.10438", example={"sparsity": 0.5, "grid": 5},
                needs_calib=True)

__all__ = ["RDConfig"]
