"""Saving and loading pruned models: ``config.json`` (with the structure spec) + safetensors.

* transformers models: ``config.hf_prune = spec`` and the model's own ``save_pretrained``; loading
  goes through a cached subclass of the model class whose ``__init__`` applies the spec, and that
  subclass's normal ``from_pretrained`` (so weight renaming, sharding, ``dtype`` and
  ``device_map`` keep working). After loading, the instance's class is set back to the plain
  transformers class: the result is an ordinary ``ViTForImageClassification`` (etc.) of pruned shape.
* timm models: timm's Hub layout (``config.json`` with ``architecture``, ``num_classes``,
  ``model_args``, ``pretrained_cfg``) plus ``hf_prune``, and ``model.safetensors``.

Loading is strict: missing, unexpected or mismatched weights raise. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.record import read_record
from .base import (PRUNED_MODEL_TYPE_PREFIX, transformers_class, base_config_class, build_base, library_of,
                   mark_pruned, transformers_base_class)
from .spec import SpecError, apply_spec, structure_spec, validate_spec

__all__ = ["save_pretrained", "AutoPrunedModel", "pruned_model_class", "read_config", "STANDALONE_FILE"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STANDALONE_FILE = "modeling_hf_prune.py"
_TEMPLATES = Path(__file__).with_name("templates")

# (auto class, name of its mapping in transformers.models.auto.modeling_auto)
_AUTO_CLASSES = (
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoBackbone", "MODEL_FOR_BACKBONE_MAPPING_NAMES"),
    ("AutoModelForSemanticSegmentation", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    ("AutoModelForObjectDetection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("AutoModelForDepthEstimation", "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES"),
    ("AutoModelForMaskedImageModeling", "MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES"),
    ("AutoModelForImageSegmentation", "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES"),
)


# --------------------------------------------------------------------------- saving



def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, metrics: dict | None = None,
                    method: str | None = None, settings: dict | None = None, stats: dict | None = None,
                    speed: dict | None = None, model_args: dict | None = None, standalone: bool = False,
                    card: bool = True, card_data: dict | None = None, repo_id: str | None = None,
                    base_model: str | None = None, image_processor=None, **save_kwargs) -> Path:
    """Save a pruned transformers or timm model to ``save_directory`` and return its path.

    Writes ``config.json`` (the base config plus the structure spec under ``hf_prune``),
    ``model.safetensors`` and, with ``card=True``, a model card ``README.md`` and the per-layer
    plot ``pruned_layers.png``. ``method``/``settings``/``stats`` (e.g. ``macs_before``,
    ``macs_after``) are recorded in the spec; ``metrics`` (``{"accuracy": 0.91}`` or a list of
    ``{"type", "value", "name", "dataset": {...}}``) and ``speed`` (``{"speedup", "device",
    "batch"}``, measured) go to the card. ``model_args``: the ``timm.create_model`` kwargs, when
    timm did not record them. ``standalone=True`` (transformers only) also writes
    ``modeling_hf_prune.py`` and ``auto_map`` so that
    ``AutoModelForImageClassification.from_pretrained(dir, trust_remote_code=True)`` works without
    hf_prune. ``image_processor``: saved with the model for ``pipeline(...)``; by default the
    processor of the model's source (see :mod:`hf_prune.hub.processor`). Other keyword arguments
    go to the transformers ``save_pretrained``.

    For transformers models the spec is also left on ``model.config.hf_prune``, so a later
    ``model.save_pretrained`` / ``model.push_to_hub`` writes a loadable checkpoint too.
    """
    save_directory = Path(save_directory)
    record = read_record(model) or {}  # what the pruning run measured, if it pruned this model
    method = method or record.get("method")
    settings = settings if settings is not None else record.get("settings")
    stats = stats if stats is not None else record.get("stats")
    library = library_of(model)
    if standalone and library != "transformers":
        raise ValueError("standalone=True needs a transformers model (the loader is transformers remote code); "
                         "wrap timm models in TimmWrapperForImageClassification for that")
    spec = structure_spec(model, method=method, settings=settings, stats=stats, model_args=model_args)
    if standalone and spec["merged_blocks"]:
        raise SpecError("standalone=True cannot describe merged (UPDP) blocks yet: save without standalone "
                        "and load with hf_prune.AutoPrunedModel")
    if standalone and any(type(m).__name__ == "PrunedMultiheadAttention" for m in model.modules()):
        raise SpecError("standalone=True cannot rebuild a pruned nn.MultiheadAttention yet: save without "
                        "standalone and load with hf_prune.AutoPrunedModel")
    from .processor import image_processor_for, save_processor  # image_processor: see hf_prune.hub.processor

    processor = image_processor_for(model, image_processor, source=spec["base"].get("source"))
    if card:  # render first: bad metrics/speed fail before anything is written
        from .card import prepare_card, write_card

        text, rows = prepare_card(spec, model=model, metrics=metrics, speed=speed, repo_id=repo_id,
                                  standalone=standalone, card_data=card_data,
                                  base_model=base_model or spec["base"].get("source"))
    save_directory.mkdir(parents=True, exist_ok=True)
    if library == "transformers":
        model.config.hf_prune = spec
        mark_pruned(model.config)
        model.save_pretrained(save_directory, **save_kwargs)
        if standalone:
            _write_standalone(model, save_directory)
    else:
        _save_timm(model, save_directory, spec)
    if not standalone and (save_directory / STANDALONE_FILE).is_file():
        (save_directory / STANDALONE_FILE).unlink()  # left by an earlier standalone save: it would not match
    save_processor(processor, save_directory)
    if card:
        write_card(save_directory, spec, text, rows)
    return save_directory


def _save_timm(model: nn.Module, path: Path, spec: dict) -> None:
    from safetensors.torch import save_model

    config = None
    model_args = spec["base"]["config"].get("model_args", {})
    try:
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(path / CONFIG_NAME), model_args=model_args)
        config = json.loads((path / CONFIG_NAME).read_text())
    except Exception:  # older timm or a model it cannot describe: write the essentials ourselves
        config = None
    if config is None:
        cfg = spec["base"]["config"].get("pretrained_cfg", {})
        config = {"architecture": spec["base"]["architecture"], "num_classes": getattr(model, "num_classes", None),
                  "model_args": model_args, "pretrained_cfg": cfg}
    config["architecture"] = spec["base"]["architecture"]
    config["hf_prune"] = spec
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    # save_model drops duplicate names of shared tensors; load_model restores them.
    save_model(model, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def _auto_map(model: nn.Module, cls: type) -> dict:
    from transformers.models.auto import modeling_auto

    model_type = base_config_class(model.config).model_type
    found = {}
    for auto_name, mapping_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name, {})
        names = mapping.get(model_type)
        names = names if isinstance(names, (tuple, list)) else (names,)
        if cls.__name__ in names:
            found[auto_name] = f"{Path(STANDALONE_FILE).stem}.{cls.__name__}"
    if not found:
        raise SpecError(f"no transformers Auto class loads {cls.__name__}; standalone=True cannot write an auto_map")
    return found


def standalone_source(cls_name: str, config_name: str, model_type: str) -> str:
    """The text of ``modeling_hf_prune.py`` for the transformers class ``cls_name`` and its config class."""
    code = (_TEMPLATES / STANDALONE_FILE).read_text()
    return code + f'''

from transformers import {cls_name} as _HfPruneBase  # noqa: E402
from transformers import {config_name} as _HfPruneBaseConfig  # noqa: E402


class {config_name}(_HfPruneBaseConfig):
    """The base model's config; config.json names it "{model_type}" so that only this file resolves it."""

    model_type = "{model_type}"


class {cls_name}(_HfPruneBase):
    """{cls_name} resized to the pruned structure in ``config.hf_prune`` (hf_prune format v1)."""

    config_class = {config_name}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_hf_prune_spec(self, config.hf_prune)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        own_memory(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded
'''


def _write_standalone(model: nn.Module, path: Path) -> None:
    cls = transformers_base_class(model)
    config_cls = base_config_class(model.config)
    model_type = PRUNED_MODEL_TYPE_PREFIX + config_cls.model_type
    (path / STANDALONE_FILE).write_text(standalone_source(cls.__name__, config_cls.__name__, model_type))
    config_file = path / CONFIG_NAME
    config = json.loads(config_file.read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": f"{Path(STANDALONE_FILE).stem}.{config_cls.__name__}", **_auto_map(model, cls)}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- loading

_SUBCLASSES: dict[type, type] = {}


def pruned_model_class(base_cls: type) -> type:
    """A subclass of the transformers class ``base_cls`` whose ``__init__`` applies ``config.hf_prune``.

    It has the same name and module as ``base_cls`` so transformers treats it as the library class
    (checkpoint renaming, ``architectures`` on save). Cached per class.
    """
    cls = _SUBCLASSES.get(base_cls)
    if cls is None:
        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            spec = getattr(config, "hf_prune", None)
            if spec is None:
                raise SpecError("config has no 'hf_prune' structure spec; this is not an hf_prune checkpoint")
            apply_spec(self, spec)

        cls = type(base_cls.__name__, (base_cls,), {
            "__init__": __init__, "__module__": base_cls.__module__, "__qualname__": base_cls.__qualname__,
            "__doc__": f"{base_cls.__name__} resized by an hf_prune structure spec at construction.",
            "_hf_prune_subclass": True,
        })
        _SUBCLASSES[base_cls] = cls
    return cls


_HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder", "proxies")


def _resolve(path_or_repo_id: str | os.PathLike, filename: str, kwargs: dict) -> str:
    subfolder = kwargs.get("subfolder") or ""
    local = Path(path_or_repo_id) / subfolder / filename
    if Path(path_or_repo_id).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{local} does not exist")
        return str(local)
    from huggingface_hub import hf_hub_download

    hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None and k != "subfolder"}
    return hf_hub_download(str(path_or_repo_id), filename, subfolder=subfolder or None, **hub)


def read_config(path_or_repo_id: str | os.PathLike, **kwargs) -> dict:
    """``config.json`` of a local directory or Hub repo, as a dict."""
    with open(_resolve(path_or_repo_id, CONFIG_NAME, kwargs), encoding="utf-8") as f:
        return json.load(f)


class AutoPrunedModel:
    """Loads any checkpoint saved by :func:`save_pretrained` / :func:`push_to_hub`.

    ``AutoPrunedModel.from_pretrained("user/vit-pruned")`` returns an ordinary transformers model
    (e.g. ``ViTForImageClassification``) or timm model with the pruned structure.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoPrunedModel.from_pretrained(path_or_repo_id)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> nn.Module:
        """Build the base architecture, apply the structure spec and load the weights strictly.

        ``pretrained_model_name_or_path``: a local directory or a Hub repo id. Keyword arguments
        go to the transformers ``from_pretrained`` (``dtype``, ``device_map``, ``revision``,
        ``token``, ...); for timm models ``revision``/``token``/``cache_dir``/... are used for the
        download and ``device``/``dtype`` are applied after loading.
        """
        kwargs = dict(kwargs)
        kwargs.pop("trust_remote_code", None)  # the spec is data: no remote code is needed
        if "ignore_mismatched_sizes" in kwargs and kwargs.pop("ignore_mismatched_sizes"):
            raise ValueError("AutoPrunedModel loads strictly; ignore_mismatched_sizes is not supported")
        name = str(pretrained_model_name_or_path)
        config = read_config(pretrained_model_name_or_path, **kwargs)
        spec = config.get("hf_prune")
        if spec is None:
            raise SpecError(f"{name} is not an hf_prune checkpoint (its config.json has no 'hf_prune' structure "
                            "spec); load it with the model's own from_pretrained (e.g. "
                            "AutoModelForImageClassification.from_pretrained or timm.create_model('hf-hub:...'))")
        validate_spec(spec)
        library = spec["base"]["library"]
        if library == "transformers":
            return _load_transformers(pretrained_model_name_or_path, spec, config, kwargs)
        return _load_timm(pretrained_model_name_or_path, spec, config, kwargs)


def _load_transformers(path, spec: dict, raw_config: dict, kwargs: dict) -> nn.Module:
    base_cls = transformers_class(spec["base"]["architecture"])
    cls = pruned_model_class(base_cls)
    want_info = kwargs.pop("output_loading_info", False)
    if "config" not in kwargs:  # config.json names the pruned model type; build the base class's config from it
        fields = {k: v for k, v in raw_config.items() if k != "model_type"}
        kwargs["config"] = base_config_class(base_cls.config_class).from_dict(fields)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatch" in str(exc):
            raise SpecError(f"the weights of {path} do not match the structure in its config.json 'hf_prune' spec "
                            f"(corrupted or edited checkpoint): {exc}") from exc
        raise
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise SpecError(f"the weights of {path} do not fit the pruned structure: "
                        + "; ".join(f"{k}: {v[:5]}" for k, v in problems.items() if v))
    model.__class__ = base_cls  # the spec is applied: from here on it is an ordinary model
    mark_pruned(model.config)  # saved again, it stays a checkpoint plain transformers refuses
    own_memory(model)
    return (model, info) if want_info else model


def own_memory(model: nn.Module) -> nn.Module:
    """Copy CPU tensors that live in the (memory-mapped, unaligned) weights file into own memory.

    Kernels may take other code paths on unaligned data, so without this a loaded model can differ
    from the saved one in the last bits (~1e-8); with it, outputs are bitwise identical.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, t in module._parameters.items():
                if t is not None and t.device.type == "cpu" and t.data_ptr() % 64:
                    t.data = t.data.clone()
            for name, t in module._buffers.items():
                if t is not None and t.device.type == "cpu" and t.data_ptr() % 64:
                    module._buffers[name] = t.clone()
    return model


def _load_timm(path, spec: dict, config: dict, kwargs: dict) -> nn.Module:
    import timm
    from safetensors.torch import load_model

    if config.get("architecture") not in (None, spec["base"]["architecture"]):
        raise SpecError(f"config.json says architecture {config.get('architecture')!r} but its hf_prune spec was made "
                        f"for {spec['base']['architecture']!r}")
    weights = _resolve(path, WEIGHTS_NAME, kwargs)
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    base = spec["base"]
    overlay = base["config"].get("pretrained_cfg") or config.get("pretrained_cfg") or {}
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in base["config"].get("model_args", {}).items()}
    try:
        model = timm.create_model(base["architecture"], pretrained=False,
                                  pretrained_cfg_overlay={k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in overlay.items() if k != "architecture"},
                                  **args)
    except TypeError:
        model = build_base(base, device="cpu")
    apply_spec(model, spec)
    try:
        load_model(model, weights, strict=True)
    except RuntimeError as exc:
        raise SpecError(f"the weights of {path} do not match the structure in its config.json 'hf_prune' spec "
                        f"(corrupted or edited checkpoint): {exc}") from exc
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
