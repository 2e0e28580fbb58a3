"""Iterative structured pruning on one traced graph: :class:`StructuredPruner`.

A pruner traces the model once, then each :meth:`StructuredPruner.step` scores units, allocates
a target and installs masks (which only ever grow), after checking on a throw-away compaction that
the result will compact and run. :meth:`StructuredPruner.compact` removes the masked units. The
one-shot :func:`hf_prune.prune` and the training callbacks are both built on it.
"""
from __future__ import annotations

import torch
from torch import nn

from .allocation import allocate
from .errors import CompactionError, PruningError
from .graph import DependencyGraph, split_inputs
from .importance import normalized_scores, unit_scores
from .masks import StructuredMask, get_mask, set_mask
from .surgery import compact_units


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


class StructuredPruner:
    """Masks that grow step by step on one dependency graph; ``compact`` ends it."""

    def __init__(self, model: nn.Module, example_inputs, *, importance="l2", mode="global", round_to=8,
                 ignored_layers=(), prune_stem=False, frozen_modules=(), frozen_splits=()):
        if get_mask(model) is not None:
            raise PruningError("this model already carries masks from an earlier prune(..., compact=False); "
                               "call hf_prune.compact(model) first")
        self.model = model
        self.example_inputs = example_inputs
        self.importance, self.mode, self.round_to = importance, mode, round_to
        self.graph = build_graph(model, example_inputs, ignored_layers=ignored_layers,
                                 prune_stem=prune_stem, frozen_modules=frozen_modules,
                                 frozen_splits=frozen_splits)
        self.removed = torch.zeros(0, dtype=torch.int64)
        self.dense_macs = self.graph.macs()
        self.dense_params = self.graph.params()

    @property
    def mask(self) -> StructuredMask | None:
        return get_mask(self.model)

    def plan(self, *, sparsity=None, target_macs=None, scores=None) -> torch.Tensor:
        """Roots to remove for a target; units removed earlier stay removed."""
        try:
            if scores is None:
                scores = unit_scores(self.graph, self.importance)
            scores = scores.clone()
            scores[self.removed] = 0.0
            removed = allocate(self.graph, scores, normalized_scores(self.graph, scores), sparsity=sparsity,
                               target_macs=target_macs, mode=self.mode, round_to=self.round_to)
        except ValueError as exc:
            raise PruningError(str(exc)) from exc
        return torch.unique(torch.cat([self.removed, removed]))

    def step(self, *, sparsity=None, target_macs=None, scores=None, compacted=False) -> StructuredMask | None:
        """Mask more units to reach the target; the model keeps its shapes (see :meth:`apply`)."""
        return self.apply(self.plan(sparsity=sparsity, target_macs=target_macs, scores=scores), compacted=compacted)

    def apply(self, removed: torch.Tensor, *, compacted: bool = False) -> StructuredMask | None:
        """Mask exactly the units ``removed`` (root ids of ``self.graph``), checked to compact.

        Replaces any earlier mask of this pruner; the model keeps its shapes. Methods that choose
        units themselves (searched widths, a resumed checkpoint) go through here. With
        ``compacted=True`` the units are removed for good instead (one-shot pruning: the check's
        compaction is kept, which saves a second compaction and forward pass); returns None then.
        """
        removed = torch.unique(torch.as_tensor(removed, dtype=torch.int64).reshape(-1))
        prunable = torch.cat([torch.zeros(0, dtype=torch.int64)] + [g.units for g in self.graph.groups])
        stray = removed[~torch.isin(removed, prunable)]
        if stray.numel():
            raise PruningError(f"apply() got {stray.numel()} ids that are not prunable units of this graph (e.g. "
                               f"{stray[:3].tolist()}); take them from DependencyGraph.groups[i].units")
        keep = self.graph.keep_mask(removed)
        old = self.mask
        if compacted:
            if old is not None:
                raise PruningError("this pruner's model carries masks; call compact() instead of compacted=True")
            self._compact_checked(keep).discard()
            self.removed = removed
            return None
        if old is not None:
            old.remove_hooks()
        mask = StructuredMask(self.model, self.graph, keep)
        try:
            mask.remove_hooks()
            # Only hand out masks that compact: try it and put the model back. The masked model has the
            # dense shapes and exact norm hooks, so the compacted forward is the one that can break.
            self._compact_checked(keep).restore()
            mask.install_hooks(self.model)
        except BaseException:
            mask.restore(self.model)
            if old is not None:
                old.install_hooks(self.model)
            raise
        mask.saved = {}
        set_mask(self.model, mask)
        self.removed = removed
        return mask

    def _compact_checked(self, keep: torch.Tensor):
        """Compact and run the example inputs; on any failure the model is restored and the error raised."""
        try:
            undo = compact_units(self.model, self.graph, keep)
        except CompactionError as exc:  # handled like a forward that breaks: keep that layer whole
            raise _BrokenForward(exc.module) from exc
        try:
            _run(self.model, self.example_inputs)
        except BaseException:
            undo.restore()
            raise
        return undo

    def stats(self) -> dict:
        keep = self.graph.keep_mask(self.removed)
        macs, params = self.graph.macs(keep), self.graph.params(keep)
        return {"macs": macs, "params": params, "macs_ratio": macs / max(self.dense_macs, 1),
                "params_ratio": params / max(self.dense_params, 1)}

    def compact(self) -> nn.Module:
        return compact(self.model)


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
    set_mask(model, None)
    return model
