"""Physical removal (compaction): slice every coupled tensor, then fix the attributes forwards read.

One engine serves every method: a method decides which units of a
:class:`~hf_prune.engine.graph.DependencyGraph` go; :func:`compact_units` removes them. All new tensors
are built before anything is assigned, and :class:`Undo` restores the model if anything fails, so
a failed call leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import sync_config
from .adapters.mha import adapt_attention
from ..errors import CompactionError
from ..core.execution import caller_threads, flush_eval_caches, single_threaded_fn
from .graph.tracer import HEAD_COUNT_ATTRS

HEAD_WIDTH_ATTRS = ("all_head_size", "attn_dim", "inner_dim", "all_head_dim")


@dataclass
class Undo:
    """Everything needed to put a model back as it was before a surgery."""

    tensors: list = field(default_factory=list)  # (module, kind, attr, old tensor)
    attrs: list = field(default_factory=list)  # (object, attr, old value)

    def set_attr(self, obj, attr, value) -> None:
        self.attrs.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def restore(self) -> None:
        for obj, attr, old in reversed(self.attrs):
            setattr(obj, attr, old)
        for module, kind, attr, old in reversed(self.tensors):
            getattr(module, kind)[attr] = old
        self.discard()

    def discard(self) -> None:
        """Forget the record: the surgery stays."""
        self.tensors.clear()
        self.attrs.clear()


def owners(model: nn.Module, name: str):
    """(module, attribute) pairs holding the parameter or buffer ``name``."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name) if module_name else model, attr


def sliced_tensors(graph, keep: torch.Tensor) -> dict:
    """New value of every tensor that loses slices, by canonical tensor name."""
    tensors = graph._named_tensors()
    new = {}
    for m in graph.members:
        idx = graph.kept_indices(m, keep)
        if idx.numel() == m.units.numel():
            continue
        t = new.get(m.tensor, tensors[m.tensor].detach())
        with caller_threads():  # copies whole weights
            new[m.tensor] = t.index_select(m.dim, idx)
    return new


@single_threaded_fn
def compact_units(model: nn.Module, graph, keep: torch.Tensor) -> Undo:
    """Remove every unit with ``keep[root] == False``. Returns the undo record."""
    undo = Undo()
    try:
        new = sliced_tensors(graph, keep)
        by_canonical: dict[str, list] = {}
        for alias, canonical in graph.trace.aliases.items():
            by_canonical.setdefault(canonical, []).append(alias)
        old_shapes = {}
        for canonical, value in new.items():
            made = None
            for alias in by_canonical.get(canonical, [canonical]):
                module, attr = owners(model, alias)
                kind = "_parameters" if attr in module._parameters else "_buffers"
                old = getattr(module, kind)[attr]
                old_shapes[id(module)] = old_shapes.get(id(module), {})
                old_shapes[id(module)][attr] = tuple(old.shape)
                if made is None:
                    made = nn.Parameter(value, requires_grad=old.requires_grad) if kind == "_parameters" else value
                undo.tensors.append((module, kind, attr, old))
                getattr(module, kind)[attr] = made
        for name, module in model.named_modules():
            shapes = old_shapes.get(id(module))
            if shapes:
                try:
                    _fix_module(module, shapes, undo)
                except Exception as exc:
                    raise CompactionError(name, f"cannot resize module '{name}' ({type(module).__name__}): "
                                                f"{exc!r}") from exc
        _fix_heads(model, graph, keep, undo)
        if hasattr(getattr(model, "config", None), "to_dict"):
            # Models built from one config object share it: the pruned one gets its own copy.
            undo.set_attr(model, "config", copy.deepcopy(model.config))
        sync_config(model, undo)
        flush_eval_caches(model)  # caches made from the dense parameters
    except BaseException:  # an interrupt too: a half-compacted model computes something else
        undo.restore()
        raise
    return undo


def _fix_module(module: nn.Module, old: dict, undo: Undo) -> None:
    """Keep the attributes of standard layers consistent with their new weight shapes."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        undo.set_attr(module, "in_features", w.shape[1])
        undo.set_attr(module, "out_features", w.shape[0])
    elif isinstance(module, nn.modules.conv._ConvNd):
        old_w = old.get("weight", tuple(w.shape))
        # Grouped convolutions lose whole groups, so the size of one group is unchanged.
        groups = 1 if module.groups == 1 else w.shape[0] // (old_w[0] // module.groups)
        if module.transposed:
            undo.set_attr(module, "in_channels", w.shape[0])
            undo.set_attr(module, "out_channels", w.shape[1] * groups)
        else:
            undo.set_attr(module, "out_channels", w.shape[0])
            undo.set_attr(module, "in_channels", w.shape[1] * groups)
        undo.set_attr(module, "groups", groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        undo.set_attr(module, "num_features", _channels(module))
    elif isinstance(module, nn.GroupNorm):
        c = _channels(module)
        per_group = module.num_channels // module.num_groups
        undo.set_attr(module, "num_groups", max(1, c // per_group) if module.num_groups > 1 else 1)
        undo.set_attr(module, "num_channels", c)
    elif isinstance(module, nn.Embedding):
        undo.set_attr(module, "embedding_dim", w.shape[1])
    _fix_shape_tuples(module, old, undo)
    if hasattr(module, "normalized_shape") and w is not None and w.dim() == 1:
        shape = module.normalized_shape
        undo.set_attr(module, "normalized_shape", (w.shape[0],) if isinstance(shape, tuple) else
                      ([w.shape[0]] if isinstance(shape, list) else w.shape[0]))


def _fix_shape_tuples(module: nn.Module, old: dict, undo: Undo) -> None:
    """Broadcast shapes stored next to a per-channel parameter, such as ``(C, 1, 1)``."""
    for attr, old_shape in old.items():
        if len(old_shape) != 1:
            continue
        new_c = getattr(module, attr).shape[0]
        for name, value in list(vars(module).items()):
            if (isinstance(value, tuple) and old_shape[0] in value and name != "normalized_shape"
                    and all(v == 1 for v in value if v != old_shape[0]) and value.count(old_shape[0]) == 1):
                undo.set_attr(module, name, tuple(new_c if v == old_shape[0] else v for v in value))


def _channels(module) -> int:
    for name in ("weight", "bias", "running_mean"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    raise ValueError(f"{type(module).__name__} has no per-channel tensor")


def _fix_heads(model: nn.Module, graph, keep: torch.Tensor, undo: Undo) -> None:
    """Attention modules store their head count; set it to the heads that remain."""
    per_module: dict[str, set] = {}
    kept: dict[str, set] = {}
    for rec in graph.trace.lanes:
        if not rec.module:
            continue
        roots = set(graph.trace.uf.find(rec.lanes).tolist())
        per_module.setdefault(rec.module, set()).update(roots)
        kept.setdefault(rec.module, set()).update(r for r in roots if keep[r])
    for name, roots in per_module.items():
        module = model.get_submodule(name)
        old = new = None
        for attr in HEAD_COUNT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value == len(roots):
                old, new = value, len(kept[name])
                undo.set_attr(module, attr, new)
        if old is None or old == new:
            continue
        for attr in HEAD_WIDTH_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value % old == 0:
                undo.set_attr(module, attr, value // old * new)
        try:
            adapt_attention(module, undo.set_attr)
        except ValueError as exc:
            raise CompactionError(name, f"cannot remove heads of '{name}': {exc}") from exc
