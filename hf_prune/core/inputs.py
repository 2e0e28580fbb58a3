"""The input and output conventions of the models hf_prune works on: one rule, used everywhere.

**Calling a model** (:func:`call_model`, :func:`model_inputs`):

* a tensor ``x`` → ``model(x)``;
* a tuple or list → ``model(*inputs)``;
* a mapping → ``model(**inputs)`` when the model's ``forward`` takes every key (transformers:
  ``{"pixel_values": x}``); otherwise, when it holds ``pixel_values`` or a single entry, that tensor
  is passed positionally (timm models take the image as their first argument and have no
  ``pixel_values`` keyword); anything else is an error naming the keys.

**Batches with labels** (:func:`split_batch`): a mapping's ``labels`` / ``label`` / ``label_ids``
entry is the target and the rest are inputs; a 2-tuple/list is ``(inputs, labels)``; a tensor is
inputs alone.

**Outputs** (:func:`logits_of`): a tensor, ``.logits`` / ``["logits"]`` (transformers) or the first
element of a tuple.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

LABEL_KEYS = ("labels", "label", "label_ids")


def _accepts(model: torch.nn.Module, key: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_inputs(model: torch.nn.Module, inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` with, by the rule in the module docstring."""
    if isinstance(inputs, Mapping) or (hasattr(inputs, "keys") and not isinstance(inputs, torch.Tensor)):
        inputs = dict(inputs)
        if all(_accepts(model, k) for k in inputs):
            return (), inputs
        if "pixel_values" in inputs:
            return (inputs["pixel_values"],), {}
        if len(inputs) == 1:
            return (next(iter(inputs.values())),), {}
        from ..errors import PruningError

        raise PruningError(f"{type(model).__name__}.forward does not take the keys {sorted(inputs)} of these inputs; "
                           "pass a tensor, a tuple of positional inputs, or a dict of its keyword arguments")
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: torch.nn.Module, inputs):
    """``model`` called on ``inputs`` by the one rule (tensor / tuple / mapping)."""
    args, kwargs = model_inputs(model, inputs)
    return model(*args, **kwargs)


def split_batch(batch, *, require_labels: bool = False) -> tuple:
    """``(inputs, labels)`` of a batch; ``labels`` is None when the batch has none (an error with
    ``require_labels``)."""
    inputs, labels = _split(batch)
    if require_labels and labels is None:
        from ..errors import PruningError

        keys = f" (keys {sorted(batch)})" if isinstance(batch, Mapping) else f" (a {type(batch).__name__})"
        raise PruningError(f"this batch has no labels{keys}; pass dicts with a 'labels' key or (inputs, labels) "
                           "pairs")
    return inputs, labels


def _split(batch) -> tuple:
    if isinstance(batch, Mapping) or (hasattr(batch, "keys") and not isinstance(batch, torch.Tensor)):
        batch = dict(batch)
        labels = next((batch.pop(k) for k in LABEL_KEYS if k in batch), None)
        for k in LABEL_KEYS:
            batch.pop(k, None)
        return batch, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    return batch, None


def first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in a (nested) tensor / mapping / tuple / list, or None."""
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(inputs) -> int:
    """The leading dimension of the first tensor in ``inputs`` (1 for a scalar or no tensor)."""
    t = first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits`` / ``["logits"]`` (transformers), or
    the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        from ..errors import PruningError

        raise PruningError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(x, device):
    """``x`` with every tensor in it (nested in mappings, tuples and lists) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x
