"""Pruned models as Hub citizens: structure spec, save/load (AutoPrunedModel), push with a model card.

A pruned model is data, not pickle: ``config.json`` holds the base config plus the structure spec
under ``hf_prune`` (see :mod:`hf_prune.hub.spec`), the weights are safetensors, and loading
rebuilds the base architecture, applies the spec and loads the weights strictly.
"""
from .io import AutoPrunedModel, save_pretrained
from .push import PushError, push_to_hub
from .spec import SpecError, apply_spec, structure_spec, validate_spec

__all__ = ["save_pretrained", "push_to_hub", "AutoPrunedModel", "structure_spec", "apply_spec", "validate_spec",
           "SpecError", "PushError"]
