"""One-shot SP without supernet training: per-group widths searched on labelled ``calib``, the model itself
being the full net that supervises the stage-wise search."""
from __future__ import annotations

import copy

from torch import nn

from ...engine.reconstruct import reconstruct_pruned
from ...errors import ConfigError
from .config import StageWiseConfig
from .stage_search import search_stats, search_subnet
from .supernet import Supernet


def prune_stagewise(model: nn.Module, config: StageWiseConfig, *, example_inputs=None, calib=None,
                    compact: bool = True) -> dict:
    """Search per-group widths under ``config.target_macs`` on ``calib`` on the untrained (e.g. pretrained)
    supernet, then extract the best subnet in place.

    ``config.search="stagewise"`` (default): every stage of a subnet is scored by its output error against
    the model itself (the full net) given the full net's stage input, stages are combined by a DP under
    the budget and the best ``final_candidates`` are checked by accuracy on ``calib``; ``"chained"``:
    evolutionary search by accuracy on ``calib``. BatchNorm is recalibrated per candidate. This is the
    paper's search without its supernet training (use :class:`StageWiseTrainer` with
    :class:`StageWiseCallback` for the method itself). Without labelled ``calib`` there is nothing to
    search with, so it is refused: data-free width pruning is ``method="depgraph"``.
    With ``config.reconstruct`` (default) the extracted subnet is re-fitted towards the full net on the
    same batches (:func:`~hf_prune.engine.reconstruct.reconstruct_pruned`). Transactional: on failure the
    model is unchanged.
    """
    if example_inputs is None:
        raise ConfigError("method 'stagewise' traces the model: pass example_inputs=")
    if calib is None:
        raise ConfigError("method 'stagewise' searches widths by accuracy: pass calib= (labelled batches, "
                          "{'pixel_values', 'labels'} dicts or (x, y) pairs); for data-free width pruning use "
                          "method='depgraph'")
    c = config
    refit = c.reconstruct and compact
    dense = copy.deepcopy(model) if refit else None  # the full net, before BatchNorms are recalibrated
    sup = Supernet(model, example_inputs, ratios=c.ratios, round_to=c.round_to, importance=c.importance,
                   stages=c.stages if c.stages == "auto" else list(c.stages), num_stages=c.num_stages,
                   ignored_layers=c.ignored_layers, prune_stem=c.prune_stem, teacher=model, make_teacher=False)
    target = sup.check_target(c.target_macs)
    batches = [b for _, b in zip(range(c.calib_batches), calib)]
    result = search_subnet(sup, c, batches, batches, target_macs=target, max_latency_ms=c.max_latency_ms,
                           example_inputs=example_inputs)
    saved = sup.bn_state()
    refitted: dict = {}
    try:
        with sup.recalibrated(result.choice, batches, persist=True):
            pass
        removed = sup.space.removed(result.choice)
        if refit:  # compaction and re-fit in one transaction
            sup.pruner.apply(removed, compacted=True,
                             after=lambda p: refitted.update(reconstruct_pruned(model, dense, p, batches)))
        else:
            sup.pruner.apply(removed)
    except BaseException:
        sup.load_bn_state(saved)
        raise
    if compact and not refit:
        sup.pruner.compact()
    stats = search_stats(sup, result)
    if refitted:
        stats["reconstruction"] = refitted
    return stats
