"""One-shot SP without supernet training: per-group widths searched by accuracy on labelled ``calib``."""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from .config import StageWiseConfig
from .supernet import Supernet


def prune_stagewise(model: nn.Module, config: StageWiseConfig, *, example_inputs=None, calib=None,
                    compact: bool = True) -> dict:
    """Search per-group widths under ``config.target_macs`` by accuracy on ``calib`` (BatchNorm recalibrated
    per candidate) on the untrained (e.g. pretrained) supernet, then extract the best subnet in place.

    This is the paper's search without its supernet training (use :class:`StageWiseTrainer` with
    :class:`StageWiseCallback` for the method itself). Without labelled ``calib`` there is nothing to
    search with, so it is refused: data-free width pruning is ``method="depgraph"``.
    Transactional: on failure the model is unchanged.
    """
    if example_inputs is None:
        raise ConfigError("method 'stagewise' traces the model: pass example_inputs=")
    if calib is None:
        raise ConfigError("method 'stagewise' searches widths by accuracy: pass calib= (labelled batches, "
                          "{'pixel_values', 'labels'} dicts or (x, y) pairs); for data-free width pruning use "
                          "method='depgraph'")
    c = config
    sup = Supernet(model, example_inputs, ratios=c.ratios, round_to=c.round_to, importance=c.importance,
                   ignored_layers=c.ignored_layers, prune_stem=c.prune_stem, make_teacher=False)
    target = sup.check_target(c.target_macs)
    batches = [b for _, b in zip(range(c.calib_batches), calib)]
    result = sup.search(lambda ch: sup.proxy_accuracy(ch, batches, batches), target_macs=target,
                        population=c.population, generations=c.generations, seed=c.seed)
    saved = sup.bn_state()
    try:
        with sup.recalibrated(result.choice, batches, persist=True):
            pass
        sup.pruner.apply(sup.space.removed(result.choice))
    except BaseException:
        sup.load_bn_state(saved)
        raise
    if compact:
        sup.pruner.compact()
    return {**sup.subnet_stats(result.choice), "proxy_accuracy": result.score}
