"""Structured masks: removed units are zeroed in place, with shapes unchanged, for training.

Zeroing every slice of a removed unit makes the masked model compute exactly what the compacted
model computes, with one exception handled here: normalisations whose statistics run over
channels (LayerNorm, GroupNorm with one group, ConvNeXt's channels-first LayerNorm) would still
count the zeroed channels. A forward hook recomputes them over the kept channels only.

The state lives on the model as ``model.hf_prune_mask`` (a :class:`StructuredMask`) until
:func:`hf_prune.compact` removes the units for real.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.distributed import fill_indices_, named_tensors
from ..core.execution import single_threaded_fn

ATTR = "hf_prune_mask"


class MaskedNorm:
    """Forward hook: recompute a channel-statistics normalisation over kept channels only."""

    def __init__(self, kept: torch.Tensor, channels: int):
        self.kept = kept
        self.channels = channels
        self.active = False

    def _dim(self, x: torch.Tensor) -> int:
        if x.shape[-1] == self.channels:
            return x.dim() - 1
        if x.dim() > 1 and x.shape[1] == self.channels:
            return 1
        raise RuntimeError(f"cannot find {self.channels} channels in input of shape {tuple(x.shape)}")

    def __call__(self, module, args, output):
        if self.active:
            return None
        x = args[0]
        d = self._dim(x)
        kept = self.kept.to(x.device)
        params = {n: p.index_select(0, kept) for n, p in module.named_parameters(recurse=False)}
        shape = getattr(module, "normalized_shape", None)
        self.active = True
        try:
            if shape is not None:
                module.normalized_shape = (kept.numel(),) if isinstance(shape, tuple) else [kept.numel()]
            sub = torch.func.functional_call(module, params, (x.index_select(d, kept),))
        finally:
            self.active = False
            if shape is not None:
                module.normalized_shape = shape
        full = output.new_zeros(output.shape)
        return full.index_copy(d, kept, sub)


class StructuredMask:
    """Which units of a dependency graph are removed, and the hooks that keep masking exact."""

    def __init__(self, model: nn.Module, graph, keep: torch.Tensor):
        self.graph = graph
        self.keep = keep
        self.handles = []
        self.saved = {}
        self._install(model)

    def removed_slices(self):
        """(tensor name, dim, removed indices) for every member that loses something."""
        for m in self.graph.members:
            gone = torch.nonzero(~self.keep[m.units]).reshape(-1)
            if gone.numel():
                yield m.tensor, m.dim, gone

    @single_threaded_fn
    def _install(self, model: nn.Module) -> None:
        tensors = self.graph._named_tensors()
        for name, _, _ in self.removed_slices():
            if name not in self.saved:
                self.saved[name] = tensors[name].detach().clone()
        try:  # everything is saved before the first zero is written, so this can be undone
            self.enforce(model)
            self.install_hooks(model)
        except BaseException:
            self.restore(model)
            raise

    def install_hooks(self, model: nn.Module) -> None:
        for rec in self.graph.trace.norms:
            roots = self.graph.trace.uf.find(rec.channels)
            kept = torch.nonzero(self.keep[roots]).reshape(-1)
            if kept.numel() == roots.numel():
                continue
            module = model.get_submodule(rec.module)
            self.handles.append(module.register_forward_hook(MaskedNorm(kept, roots.numel())))

    @torch.no_grad()
    @single_threaded_fn
    def enforce(self, model: nn.Module) -> None:
        """Zero removed slices of ``model`` again (call after every optimizer step). ``model`` is the traced
        one or one of the same structure, e.g. its FSDP2-sharded original (each rank zeroes its shards)."""
        tensors = self.graph._named_tensors() if model is self.graph.model else named_tensors(model)
        for name, dim, gone in self.removed_slices():
            fill_indices_(tensors[name], dim, gone, 0)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Undo the mask: original values back, hooks removed."""
        tensors = self.graph._named_tensors()
        for name, value in self.saved.items():
            tensors[name].copy_(value)
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def get_mask(model: nn.Module) -> StructuredMask | None:
    return model.__dict__.get(ATTR)


def set_mask(model: nn.Module, mask: StructuredMask | None) -> None:
    if mask is None:
        model.__dict__.pop(ATTR, None)
    else:
        model.__dict__[ATTR] = mask
