"""Public entry points: :func:`prune` and :func:`compact`.

``prune`` is transactional: it traces, scores and allocates without touching the model, then
masks (and by default compacts) and checks that the result still runs; on any failure the model
is restored exactly and a :class:`PruningError` says what went wrong and what to do.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .allocation import allocate
from .errors import PruningError
from .graph import DependencyGraph, split_inputs
from .importance import normalized_scores, unit_scores
from .masks import StructuredMask, get_mask, set_mask
from .surgery import compact_units

STRUCTURED_METHODS = ("depgraph",)
MAX_REPAIRS = 4


def _run(model: nn.Module, example_inputs):
    """Run the model; on failure raise :class:`_BrokenForward` naming the innermost failing module."""
    args, kwargs = split_inputs(example_inputs)
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def push(module, _):
        stack.append(names.get(id(module), ""))

    def pop(module, _, __):
        stack.pop()  # not reached when the module raises, so the culprit stays on top

    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        raise _BrokenForward(stack[-1] if stack else "") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class _BrokenForward(Exception):
    """The pruned model did not run (the model has been restored); ``args[0]`` names the module."""


def build_graph(model: nn.Module, example_inputs, **options) -> DependencyGraph:
    """Trace ``model``; a failure names the module where the forward pass broke."""
    if example_inputs is None:
        raise PruningError("structured pruning needs example_inputs (a tensor, tuple or dict such as "
                           "{'pixel_values': x}) to trace the model")
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def push(module, _):
        stack.append(names.get(id(module), type(module).__name__))

    def pop(module, _, __):
        stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    try:
        return DependencyGraph(model, example_inputs, **options)
    except PruningError:
        raise
    except Exception as exc:
        where = stack[-1] if stack else "the model's forward"
        raise PruningError(f"could not trace the model: {type(exc).__name__} in module '{where}': {exc}. "
                           "Check that example_inputs run through model(...) as given.") from exc
    finally:
        for h in handles:
            h.remove()


def _taylor_gradients(model, calib, loss_fn, max_batches=8):
    if calib is None:
        return
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)


def prune(model: nn.Module, method: str = "depgraph", *, example_inputs=None, sparsity=None,
          target_macs=None, importance="l2", mode="global", round_to=8, ignored_layers=(),
          prune_stem=False, compact=True, calib=None, loss_fn=None):
    """Prune ``model`` in place and return it.

    method: ``"depgraph"`` (structured: channels, heads, groups). Targets: ``sparsity`` (fraction
    of prunable parameters to remove) or ``target_macs`` (fraction of dense MACs to keep).
    importance: ``"l2"`` | ``"l1"`` | ``"taylor"``. mode: ``"global"`` | ``"local"``. round_to:
    channel multiple kept per group (None to disable). ``compact=False`` leaves masks (fixed
    shapes, for training); :func:`compact` removes them later.
    """
    if method not in STRUCTURED_METHODS:
        raise PruningError(f"unknown method {method!r}; available: {', '.join(STRUCTURED_METHODS)}")
    if get_mask(model) is not None:
        raise PruningError("this model already carries masks from an earlier prune(..., compact=False); "
                           "call hf_prune.compact(model) first")
    if importance == "taylor":
        _taylor_gradients(model, calib, loss_fn)
    options = dict(ignored_layers=ignored_layers, prune_stem=prune_stem)
    target = dict(sparsity=sparsity, target_macs=target_macs, mode=mode, round_to=round_to)
    frozen: list[str] = []
    repairs = 0
    for _ in range(MAX_REPAIRS + 1):
        try:
            return _prune_once(model, example_inputs, importance, dict(options, frozen_modules=frozen),
                               target, compact)
        except _BrokenForward as exc:
            # A layer read a width the trace cannot see (e.g. head size as C // num_heads, or equal
            # chunks of a split). Keep every layer of that class whole and try again.
            culprit = exc.args[0]
            if not culprit or culprit in frozen or repairs == MAX_REPAIRS:
                raise PruningError(f"pruning failed and the model was restored: {exc.__cause__!r} in "
                                   f"module '{culprit}'. That layer reads a width the trace cannot see; "
                                   "pass it in ignored_layers or use a smaller target.") from exc.__cause__
            warnings.warn(f"pruning '{culprit}' broke the forward pass ({exc.__cause__!r}); "
                          "keeping that layer whole and retrying", stacklevel=2)
            kind = type(model.get_submodule(culprit))
            frozen.extend(n for n, m in model.named_modules() if type(m) is kind)
            repairs += 1
    raise AssertionError("unreachable")


def _prune_once(model, example_inputs, importance, options, target, compact):
    graph = build_graph(model, example_inputs, **options)
    try:
        scores = unit_scores(graph, importance)
        removed = allocate(graph, scores, normalized_scores(graph, scores), **target)
    except ValueError as exc:
        raise PruningError(str(exc)) from exc
    keep = graph.keep_mask(removed)
    mask = StructuredMask(model, graph, keep)
    try:
        _run(model, example_inputs)
        # Compact even when masks are asked for: a mask is only handed out if it can be compacted.
        mask.remove_hooks()
        undo = compact_units(model, graph, keep)
        try:
            _run(model, example_inputs)
        except BaseException:
            undo.restore()
            raise
        if not compact:
            undo.restore()
            mask.install_hooks(model)
    except BaseException:
        mask.restore(model)
        raise
    if not compact:
        set_mask(model, mask)
    mask.saved = {}
    return model


def compact(model: nn.Module) -> nn.Module:
    """Physically remove what masks removed; the outputs stay the same."""
    mask = get_mask(model)
    if mask is None:
        raise PruningError("this model has no masks to compact; prune it with compact=False first")
    mask.remove_hooks()
    undo = compact_units(model, mask.graph, mask.keep)
    try:
        _run(model, mask.graph.example_inputs)
    except _BrokenForward as exc:
        undo.restore()
        mask.install_hooks(model)
        raise PruningError(f"compaction broke the forward pass in '{exc.args[0]}': {exc.__cause__!r}; "
                           "the masked model is unchanged") from exc.__cause__
    mask.remove_hooks()
    set_mask(model, None)
    return model
