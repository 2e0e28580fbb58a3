"""Keep a transformers config truthful after compaction.

A config holds one number per concept (``num_attention_heads``, ``intermediate_size``,
``hidden_size``) while pruning may leave every layer different. Fields are updated when the pruned
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
    if (isinstance(classifier, nn.Linear) and isinstance(getattr(config, "hidden_size", None), int)
            and not isinstance(getattr(config, "hidden_sizes", None), list)):
        undo.set_attr(config, "hidden_size", classifier.in_features)
