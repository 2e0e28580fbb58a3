"""SP (Zhang et al., arXiv 2011.04908): stage-wise width supernet with full-net supervision, then search.

:mod:`.config` (:class:`StageWiseConfig`), :mod:`.supernet` (widths over the engine's coupled groups,
stages, masking, BatchNorm recalibration, search, extraction), :mod:`.oneshot` (:func:`prune_stagewise`,
the search without supernet training), :mod:`.callback` (:class:`StageWiseCallback`,
:class:`StageWiseTrainer`).
"""
from ...registry import register_method
from .config import StageWiseConfig

register_method("stagewise", StageWiseConfig, f"{__name__}.oneshot:prune_stagewise",
                f"{__name__}.callback:StageWiseCallback", kind="structured",
                paper="Zhang et al., arXiv 2011.04908",
                example={"target_macs": 0.7, "num_stages": 2, "population": 4, "generations": 1, "calib_batches": 2},
                needs_calib=True, trainer=f"{__name__}.callback:StageWiseTrainer")

__all__ = ["StageWiseConfig"]
