"""Keep a transformers config truthful after compaction.

A config holds one number per concept (``num_attention_heads``, ``intermediate_size``,
``hidden_size``, the last of ``hidden_sizes``) while pruning may leave every layer different. Fields are updated when the pruned
model is uniform again, and left at the base value otherwise; the per-layer truth is always in the
structure spec (``config.hf_prune``) that hf_prune writes when saving.
"""
from __future__ import annotations

from torch import nn

_MLP_IN = ("intermediate.dense", "mlp.fc1", "intermediate_dense", "pwconv1")


def _uniform(values):
    values = set(values)
    return values.pop() if len(values) == 1 else None


def sync_config(model: nn.Module, undo) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    modules = list(model.named_modules())
    heads = _uniform(m.num_attention_heads for n, m in modules
                     if n and isinstance(getattr(m, "num_attention_heads", None), int))
    if heads is not None and isinstance(getattr(config, "num_attention_heads", None), int):
        undo.set_attr(config, "num_attention_heads", heads)
    mlp = _uniform(m.out_features for n, m in modules
                   if isinstance(m, nn.Linear) and n.endswith(_MLP_IN))
    if mlp is not None and isinstance(getattr(config, "intermediate_size", None), int):
        undo.set_attr(config, "intermediate_size", mlp)
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        return
    sizes = getattr(config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes and isinstance(sizes[-1], int):
        # The last stage feeds the classifier, and some heads read its width from here
        # (Segformer: ``reshape(batch, -1, config.hidden_sizes[-1])``).
        undo.set_attr(config, "hidden_sizes", type(sizes)([*sizes[:-1], classifier.in_features]))
    elif isinstance(getattr(config, "hidden_size", None), int):
        undo.set_attr(config, "hidden_size", classifier.in_features)
