"""Public entry points: :func:`prune` (one-shot) and :func:`compact`.

``prune`` is transactional: it traces, scores and allocates without touching the model, then
masks (and by default compacts) and checks that the result still runs; on any failure the model
is restored exactly and a :class:`PruningError` says what went wrong and what to do. Layers that
read a width the trace cannot see are found by that check, kept whole, and pruning is retried.
"""
from __future__ import annotations

from torch import nn

from .errors import PruningError
from .engine.pruner import StructuredPruner, compact, with_repairs
from .core.execution import eval_mode

__all__ = ["prune", "compact", "PruningError"]

STRUCTURED_METHODS = ("depgraph",)
WEIGHT_METHODS = ("rd", "ovit", "magnitude")
PRUNE_RECORD = "hf_prune_record"  # model attribute: method, settings and before/after counts


def _prune_weights(model, method, sparsity, calib, example_inputs, ignored_layers, loss_fn, options):
    from .sparse.allocation import prune_weights

    if sparsity is None and options.get("nm") is None:
        raise PruningError(f"method={method!r} removes individual weights: give sparsity= (fraction of the "
                           "prunable weights to zero) or nm=(2, 4), not target_macs")
    if loss_fn is not None:
        if method != "ovit":
            raise PruningError(f"loss_fn is used by method='ovit' (its gradients), not by method={method!r}")
        options = dict(options, loss_fn=loss_fn)
    exclude = tuple(options.pop("exclude", ())) + tuple(ignored_layers)
    stats = prune_weights(model, method=method, sparsity=sparsity, calib=calib, example_inputs=example_inputs,
                          exclude=exclude, **options)
    model.__dict__[PRUNE_RECORD] = {
        "method": method, "settings": stats["settings"],
        "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }
    return model


def _prune_depth(model, example_inputs, blocks, num_blocks, target_macs):
    from .methods.updp.depth import prune_depth

    model, record = prune_depth(model, example_inputs=example_inputs, blocks=blocks, num_blocks=num_blocks,
                                target_macs=target_macs)
    stats = {"macs_before": record.get("macs_before"), "macs_after": record.get("macs_after")}
    model.__dict__[PRUNE_RECORD] = {
        "method": "updp",
        "settings": {k: v for k, v in dict(record.get("settings", {}), blocks=[b["path"] for b in record["merged_blocks"]]).items()
                     if isinstance(v, (int, float, str, list, type(None)))},
        "stats": {k: v for k, v in stats.items() if v is not None},
    }
    return model


def _batch_size(example_inputs) -> int:
    first = next(iter(example_inputs.values())) if isinstance(example_inputs, dict) else (
        example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs)
    return int(first.shape[0]) if getattr(first, "dim", lambda: 0)() else 1


def _taylor_gradients(model, calib, loss_fn, max_batches=8):
    if calib is None:
        return
    model.zero_grad(set_to_none=True)
    with eval_mode(model):
        for i, batch in enumerate(calib):
            if i >= max_batches:
                break
            if isinstance(batch, dict):
                labels = batch.get("labels")
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                out, labels = model(batch[0]), batch[1]
            logits = out.logits if hasattr(out, "logits") else out
            loss = loss_fn(logits, labels) if loss_fn else nn.functional.cross_entropy(logits, labels)
            loss.backward()


def prune(model: nn.Module, method: str = "depgraph", *, example_inputs=None, sparsity=None,
          target_macs=None, importance="l2", mode="global", round_to=8, ignored_layers=(),
          prune_stem=False, compact=True, calib=None, loss_fn=None, blocks=None, num_blocks=None,
          **method_options):
    """Prune ``model`` in place and return it.

    method: ``"depgraph"`` (structured: channels, heads, groups), ``"updp"`` (depth: whole blocks
    merged into fewer linear layers; give ``blocks=[...]``, ``num_blocks=k`` or ``target_macs``),
    ``"stagewise"`` (one-shot width search under ``target_macs`` scored on labelled ``calib``
    batches; the paper's method trains a supernet first: :class:`hf_prune.StageWiseTrainer`), or
    ``"rd"`` / ``"ovit"`` / ``"magnitude"`` (individual weights; give ``sparsity`` and ``calib``).
    Targets: ``sparsity`` (fraction of prunable parameters to remove) or ``target_macs`` (fraction
    of dense MACs to keep).
    importance: ``"l2"`` | ``"l1"`` | ``"taylor"``. mode: ``"global"`` | ``"local"``. round_to:
    channel multiple kept per group (None to disable). ``compact=False`` leaves masks (fixed
    shapes, for training); :func:`compact` removes them later.
    ``method_options`` go to the weight-pruning methods (:func:`hf_prune.sparse.allocation.
    prune_weights`): ``allocation``, ``nm``, ``layers``, ``exclude`` and, for oViT, ``block_size``,
    ``num_grads``, ``damping``, ``fisher``, ``max_fisher_mb``, ``dtype``, ...; for RD ``grid``,
    ``reduction``, ``max_batches``, ``max_sparsity``, ... (``ignored_layers`` are excluded too).
    """
    if method_options and method not in WEIGHT_METHODS:
        raise TypeError(f"unexpected options {sorted(method_options)} for method={method!r}")
    if method == "updp":
        return _prune_depth(model, example_inputs, blocks, num_blocks, target_macs)
    if method == "stagewise":
        from .methods.stagewise.supernet import prune_stagewise

        return prune_stagewise(model, example_inputs, target_macs, sparsity=sparsity, calib=calib, round_to=round_to,
                               ignored_layers=ignored_layers, prune_stem=prune_stem, compact=compact)
    if method in WEIGHT_METHODS:
        return _prune_weights(model, method, sparsity, calib, example_inputs, ignored_layers, loss_fn,
                              method_options)
    if method not in STRUCTURED_METHODS:
        raise PruningError(f"unknown method {method!r}; available: "
                           f"{', '.join(STRUCTURED_METHODS + ('updp', 'stagewise') + WEIGHT_METHODS)}")
    if importance == "taylor":
        _taylor_gradients(model, calib, loss_fn)
    def build(frozen_modules, frozen_splits):
        return StructuredPruner(model, example_inputs, importance=importance, mode=mode, round_to=round_to,
                                ignored_layers=ignored_layers, prune_stem=prune_stem,
                                frozen_modules=frozen_modules, frozen_splits=frozen_splits)

    pruner = with_repairs(model, build, lambda p: p.step(sparsity=sparsity, target_macs=target_macs,
                                                          compacted=compact))
    stats = pruner.stats()
    model.__dict__[PRUNE_RECORD] = {
        "method": method,
        "settings": {"target_macs": target_macs, "sparsity": sparsity, "importance": importance,
                     "mode": mode, "round_to": round_to, "prune_stem": prune_stem},
        "stats": {"params_before": pruner.dense_params, "params_after": stats["params"],
                  "macs_before": pruner.dense_macs, "macs_after": stats["macs"],
                  "macs_batch_size": _batch_size(example_inputs)},
    }
    return model
