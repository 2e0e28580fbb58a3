"""One-shot DepGraph: trace, score, allocate and compact in one transactional call."""
from __future__ import annotations

import copy

from torch import nn

from ...core.execution import eval_mode
from ...core.inputs import batch_size, call_model, logits_of, split_batch
from ...engine.importance import unit_scores
from ...engine.pruner import StructuredPruner, with_repairs
from ...engine.reconstruct import reconstruct_pruned
from ...errors import ConfigError
from .config import DepGraphConfig


def taylor_gradients(model: nn.Module, calib, loss_fn=None, max_batches: int = 8) -> None:
    """Accumulate ``∂L/∂w`` over up to ``max_batches`` labelled ``calib`` batches (eval mode), for Taylor scores."""
    model.zero_grad(set_to_none=True)
    with eval_mode(model):
        for i, batch in enumerate(calib):
            if i >= max_batches:
                break
            inputs, labels = split_batch(batch)
            if labels is None:
                raise ConfigError("importance='taylor' needs labelled calib batches ({'pixel_values', 'labels'} "
                                  "dicts or (x, y) pairs) to compute gradients")
            logits = logits_of(call_model(model, inputs))
            loss = loss_fn(logits, labels) if loss_fn else nn.functional.cross_entropy(logits, labels)
            loss.backward()


def prune_depgraph(model: nn.Module, config: DepGraphConfig, *, example_inputs=None, calib=None, loss_fn=None,
                   compact: bool = True) -> dict:
    """Prune ``model`` in place to ``config``'s target; returns parameter and MAC counts before/after.

    ``compact=False`` leaves masks (fixed shapes, for training); :func:`hf_prune.compact` removes them.
    With ``calib`` (and ``config.reconstruct`` not False) the compacted model is re-fitted towards the
    dense one (:func:`~hf_prune.engine.reconstruct.reconstruct_pruned`).
    """
    if config.importance in ("taylor", "activation") and calib is None:
        need = "gradients (labelled batches)" if config.importance == "taylor" else "layer inputs (any model inputs)"
        raise ConfigError(f"importance={config.importance!r} needs {need}: pass calib=")
    if config.importance == "taylor":
        taylor_gradients(model, calib, loss_fn)
    refit_wanted = config.reconstruct if config.reconstruct is not None else (calib is not None and compact)
    if refit_wanted and (calib is None or not compact):
        raise ConfigError("reconstruct=True re-fits the compacted model on calibration data: pass calib= and keep "
                          "compact=True (or set reconstruct=False)")
    dense = copy.deepcopy(model) if refit_wanted else None

    def build(frozen_modules, frozen_splits):
        return StructuredPruner(model, example_inputs, importance=config.importance, mode=config.mode,
                                round_to=config.round_to, ignored_layers=config.ignored_layers,
                                prune_stem=config.prune_stem, frozen_modules=frozen_modules,
                                frozen_splits=frozen_splits)

    target = {config.target_kind: getattr(config, config.target_kind)}
    if config.target_latency is not None:
        target.update(config.latency_options())
    refitted: dict = {}

    def refit(pruner):  # inside the compaction's transaction: a failure here undoes the prune too
        refitted.update(reconstruct_pruned(model, dense, pruner, calib, layers=config.reconstruct_layers))

    def attempt(pruner):  # a repair builds a new graph: data-aware scores are taken on each one
        scores = unit_scores(pruner.graph, "activation", calib=calib) if config.importance == "activation" else None
        pruner.step(**target, scores=scores, compacted=compact, after=refit if refit_wanted else None)

    pruner = with_repairs(model, build, attempt)
    stats = pruner.stats()
    out = {"params_before": pruner.dense_params, "params_after": stats["params"],
           "macs_before": pruner.dense_macs, "macs_after": stats["macs"],
           "macs_batch_size": batch_size(example_inputs)}
    measured = (getattr(pruner, "latency_report", None) or {}).get("measured")
    if measured:
        out["speed"] = measured  # the plan timed against the dense model (device, batch, dtype included)
    if refitted:
        out["reconstruction"] = refitted
    return out
