"""The base model of a pruned model: how to describe it in JSON and how to build it again.

A pruned model is "a freshly built base model, resized by the structure spec". The base is:

* transformers: the library class (the first class in the model's MRO that transformers defines,
  so subclasses made by :class:`~hf_prune.hub.AutoPrunedModel` or remote code resolve to it)
  built from the model's config (without its ``hf_prune`` key);
* timm: ``timm.create_model(architecture, pretrained=False, **model_args)`` with the arguments
  timm recorded when the model was created (``model._model_args``, timm >= 1.0.20) or those the
  caller passes.

Bases are built on the ``meta`` device where possible: only shapes and attributes matter here.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import torch
from torch import nn

from ..errors import SpecError

__all__ = ["library_of", "transformers_base_class", "describe_base", "build_base", "timm_model_args", "mark_pruned",
           "base_config_class", "pruned_config_class", "PRUNED_MODEL_TYPE_PREFIX"]

# A pruned transformers checkpoint says model_type "hf_prune_<base type>" in its config.json: the Auto
# classes of a plain transformers do not know it and refuse to load it (instead of building the dense
# architecture and silently re-initialising what pruning changed, e.g. UPDP's merged blocks);
# hf_prune's loader and the remote code of standalone checkpoints resolve it to the base class.
PRUNED_MODEL_TYPE_PREFIX = "hf_prune_"
_PRUNED_CONFIGS: dict[type, type] = {}

# (Auto class, its mapping of model type -> class name in transformers.models.auto.modeling_auto)
VISION_AUTO_CLASSES = (
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoBackbone", "MODEL_FOR_BACKBONE_MAPPING_NAMES"),
    ("AutoModelForSemanticSegmentation", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    ("AutoModelForObjectDetection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("AutoModelForDepthEstimation", "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES"),
    ("AutoModelForMaskedImageModeling", "MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES"),
    ("AutoModelForImageSegmentation", "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES"),
)

# pretrained_cfg keys worth keeping in a timm base description (data config and provenance).
_TIMM_CFG_KEYS = ("architecture", "tag", "hf_hub_id", "num_classes", "input_size", "fixed_input_size",
                  "interpolation", "crop_pct", "crop_mode", "mean", "std", "pool_size", "first_conv",
                  "classifier", "license")


def library_of(model: nn.Module) -> str:
    """``"transformers"`` for a ``PreTrainedModel``, ``"timm"`` for a model made by ``timm.create_model``."""
    for cls in type(model).__mro__:
        if cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers"):
            return "transformers"
    if any(cls.__module__.startswith("timm.") for cls in type(model).__mro__) and hasattr(model, "pretrained_cfg"):
        return "timm"
    raise SpecError(f"{type(model).__name__} is neither a transformers PreTrainedModel nor a timm model "
                    "(made by timm.create_model); hf_prune can only save and publish those")


def transformers_base_class(model_or_class) -> type:
    """The transformers class a (possibly subclassed) PreTrainedModel instance or class derives from."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for c in cls.__mro__:
        if (c.__module__.startswith("transformers.") and getattr(c, "_auto_class", None) is None
                and not c.__dict__.get("_hf_prune_subclass", False)):
            return c
    raise SpecError(f"{cls.__name__} does not derive from a transformers model class")


def base_config_class(config_or_class) -> type:
    """The transformers config class of a (possibly :func:`mark_pruned`) config or config class."""
    cls = config_or_class if isinstance(config_or_class, type) else type(config_or_class)
    while cls.__dict__.get("_hf_prune_config", False):
        cls = cls.__bases__[0]
    return cls


def mark_pruned(config) -> None:
    """Make ``config`` save with ``model_type = "hf_prune_<base type>"`` (see ``PRUNED_MODEL_TYPE_PREFIX``).

    transformers writes the class attribute ``model_type``, so the instance's class becomes a cached
    subclass of its own that only changes that attribute; the model computes exactly as before.
    """
    config.__class__ = pruned_config_class(config)


def pruned_config_class(config_or_class) -> type:
    """The cached config class that :func:`mark_pruned` gives configs of this (base) config class."""
    base = base_config_class(config_or_class)
    sub = _PRUNED_CONFIGS.get(base)
    if sub is None:
        sub = type(base.__name__, (base,), {
            "model_type": PRUNED_MODEL_TYPE_PREFIX + base.model_type, "_hf_prune_config": True,
            "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": f"{base.__name__} of a model pruned by hf_prune (saved as a pruned model type)."})
        _PRUNED_CONFIGS[base] = sub
    return sub


def _jsonable(value: Any) -> Any:
    """A JSON-compatible copy of ``value`` (tuples become lists); raises TypeError if impossible."""
    return json.loads(json.dumps(value))


def timm_model_args(model: nn.Module, model_args: dict | None = None) -> dict:
    """The ``timm.create_model`` keyword arguments that rebuild ``model``'s base architecture."""
    try:
        from timm.models._input import get_model_args
    except ImportError:  # older timm: only what the factory recorded, if anything
        args = dict(getattr(model, "_model_args", {}) or {})
        args.update(model_args or {})
        args.setdefault("num_classes", getattr(model, "num_classes", None))
    else:
        args = get_model_args(model, model_args)
    args = {k: v for k, v in args.items() if v is not None}
    try:
        return _jsonable(args)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"timm model arguments {args!r} are not JSON-serialisable; pass model_args= with "
                        "serialisable replacements") from exc


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_source(model: nn.Module) -> str | None:
    """The Hub repo id of the unpruned weights, when the model says so (else None)."""
    previous = getattr(getattr(model, "config", None), "hf_prune", None)
    if isinstance(previous, dict) and isinstance(previous.get("base"), dict):
        return previous["base"].get("source")  # a loaded pruned model: its config names the pruned repo
    candidates = [getattr(getattr(model, "config", None), "_name_or_path", None),
                  (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")]
    for name in candidates:
        if isinstance(name, str) and _REPO_ID.match(name) and not os.path.exists(name):
            return name
    return None


def describe_base(model: nn.Module, model_args: dict | None = None) -> dict:
    """``{"library", "architecture", "config", "source"}`` for the spec's ``base`` field."""
    desc = _describe_base(model, model_args)
    desc["source"] = base_source(model)
    return desc


def _describe_base(model: nn.Module, model_args: dict | None = None) -> dict:
    library = library_of(model)
    if library == "transformers":
        cls = transformers_base_class(model)
        config = model.config.to_diff_dict()
        config.pop("hf_prune", None)
        config.pop("_name_or_path", None)
        config.pop("transformers_version", None)
        config.pop("auto_map", None)
        config["model_type"] = base_config_class(model.config).model_type
        config["architectures"] = [cls.__name__]
        config = json.loads(json.dumps(config, default=str))  # informative copy: be lenient
        return {"library": "transformers", "architecture": cls.__name__, "config": config}
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    arch = cfg.get("architecture") or getattr(model, "default_cfg", {}).get("architecture")
    if not arch:
        raise SpecError(f"cannot tell which timm architecture {type(model).__name__} is (no pretrained_cfg)")
    essentials = {k: cfg[k] for k in _TIMM_CFG_KEYS if cfg.get(k) is not None}
    try:
        essentials = _jsonable(essentials)
    except (TypeError, ValueError):
        essentials = {k: v for k, v in essentials.items() if isinstance(v, (str, int, float, list, tuple))}
        essentials = _jsonable(essentials)
    return {"library": "timm", "architecture": arch,
            "config": {"model_args": timm_model_args(model, model_args), "pretrained_cfg": essentials}}


def transformers_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise SpecError(f"transformers {transformers.__version__} has no model class {name!r}; "
                        "a newer transformers may be needed to load this checkpoint")
    return cls


def _timm_args(model_args: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}


def build_base(base: dict, *, config=None, device: str | torch.device = "meta") -> nn.Module:
    """Build the base model described by a spec's ``base`` field (random or meta weights).

    For transformers, ``config`` (a ``PretrainedConfig``) is used when given, else one is made
    from ``base["config"]``; its ``hf_prune`` key is dropped so the model is the plain base.
    """
    library, arch = base["library"], base["architecture"]
    with torch.device(device):
        if library == "transformers":
            cls = transformers_class(arch)
            if config is None:
                from transformers import AutoConfig

                cfg = dict(base["config"])
                config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            else:
                config = copy.deepcopy(config)
            if hasattr(config, "hf_prune"):
                delattr(config, "hf_prune")
            return cls(config)
        import timm

        return timm.create_model(arch, pretrained=False, **_timm_args(base["config"].get("model_args", {})))


def base_model_of(model: nn.Module, model_args: dict | None = None, device="meta") -> nn.Module:
    """A freshly built base model with ``model``'s configuration."""
    desc = describe_base(model, model_args)
    return build_base(desc, config=getattr(model, "config", None) if desc["library"] == "transformers" else None,
                      device=device)
