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
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ..core.record import read_record
from .base import (PRUNED_MODEL_TYPE_PREFIX, VISION_AUTO_CLASSES, base_config_class, library_of, mark_pruned, transformers_base_class,
                   transformers_class)
from .spec import SpecError, apply_spec, structure_spec, validate_spec

__all__ = ["save_pretrained", "save_checkpoint", "write_atomically", "AutoPrunedModel", "pruned_model_class",
           "read_config", "STANDALONE_FILE", "PROCESSOR_FILES"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STANDALONE_FILE = "modeling_hf_prune.py"
_TEMPLATES = Path(__file__).with_name("templates")



# --------------------------------------------------------------------------- saving

# Weight files of any format that a save of this library may leave behind or find from another writer:
# removed (together with the previous checkpoint's files) once a new save is in place.
_WEIGHT_FILE = re.compile(r"^(pytorch_model|model|tf_model|flax_model)(-\d+-of-\d+)?\.(bin|safetensors|h5|msgpack)"
                          r"(\.index\.json)?$")
# Files an image processor writes (``processor.save_pretrained``); uploaded with the model when present.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


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

    The save is atomic: everything is written into a temporary folder beside ``save_directory``
    and then moved into place; if anything fails (an interrupt included) the previous checkpoint
    in ``save_directory`` is left byte for byte as it was. Weight files of other formats or
    shardings left by an earlier save (``pytorch_model.bin``, ``model.safetensors.index.json`` and
    its shards, ...) are removed once the new checkpoint is in place; other files are kept.

    For transformers models the spec is also left on ``model.config.hf_prune``, so a later
    ``model.save_pretrained`` / ``model.push_to_hub`` writes a loadable checkpoint too.
    """
    save_directory = Path(save_directory)
    save_checkpoint(model, save_directory, metrics=metrics, method=method, settings=settings, stats=stats,
                    speed=speed, model_args=model_args, standalone=standalone, card=card, card_data=card_data,
                    repo_id=repo_id, base_model=base_model, image_processor=image_processor, **save_kwargs)
    return save_directory


def save_checkpoint(model: nn.Module, save_directory: str | os.PathLike, *, metrics: dict | None = None,
                    method: str | None = None, settings: dict | None = None, stats: dict | None = None,
                    speed: dict | None = None, model_args: dict | None = None, standalone: bool = False,
                    card: bool = True, card_data: dict | None = None, repo_id: str | None = None,
                    base_model: str | None = None, image_processor=None, **save_kwargs) -> list[str]:
    """:func:`save_pretrained`, returning the names of the files this save wrote (what a push uploads)."""
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

    def write(folder: Path) -> None:
        if library == "transformers":
            model.config.hf_prune = spec
            mark_pruned(model.config)
            model.save_pretrained(folder, **save_kwargs)
            if standalone:
                _write_standalone(model, folder)
        else:
            _save_timm(model, folder, spec)
        save_processor(processor, folder)
        if card:
            write_card(folder, spec, text, rows)

    return write_atomically(Path(save_directory), write)


def _stale(name: str, written: set) -> bool:
    """A file of an earlier save that would contradict the new one (other weight formats, old remote code)."""
    return name not in written and (bool(_WEIGHT_FILE.match(name)) or name == STANDALONE_FILE)


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # atomic on one file system; the staging folder sits beside the target for that


def write_atomically(target: Path, write) -> list[str]:
    """Call ``write(folder)`` on a fresh folder beside ``target``, then move its files into ``target``.

    Returns the names written. On any failure (``BaseException`` included) ``target`` is left
    exactly as it was. Stale files (:func:`_stale`) go with the old versions of the files replaced,
    and are deleted only once every new file is in place.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_folder(target, "new")
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        folders = [n for n in names if not (staging / n).is_file() or (staging / n).is_symlink()]
        if folders:
            raise RuntimeError(f"saving wrote {folders} into {staging}, which are not plain files; nothing was "
                               f"moved into {target}")
        if not target.exists():
            _move(staging, target)  # one rename: the whole checkpoint appears at once
        else:
            _replace_files(staging, target, names)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fresh_folder(target: Path, kind: str) -> Path:
    """An empty folder beside ``target`` (same file system, so moves are renames), with default permissions.

    Where the parent is not writable but ``target`` exists, the folder is made inside ``target``.
    """
    while True:
        name = f".{target.name}.hf_prune-{kind}-{uuid.uuid4().hex[:12]}"
        try:
            (target.parent / name).mkdir()
            return target.parent / name
        except FileExistsError:
            continue
        except PermissionError:
            if not target.is_dir():
                raise
            (target / name).mkdir()
            return target / name


def _replace_files(staging: Path, target: Path, names: list[str]) -> None:
    """Move ``names`` from ``staging`` into the existing ``target``, all or nothing."""
    written = set(names)
    old = [n for n in sorted(os.listdir(target)) if n in written or _stale(n, written)]
    backup = _fresh_folder(target, "old")
    moved_out, moved_in = [], []
    # config.json last: until it is in place the folder does not load at all, never half new.
    order = sorted(names, key=lambda n: n == CONFIG_NAME)
    try:
        for n in old:
            _move(target / n, backup / n)
            moved_out.append(n)
        for n in order:
            _move(staging / n, target / n)
            moved_in.append(n)
    except BaseException as exc:
        failed = []
        for src, dst in [(target / n, staging / n) for n in reversed(moved_in)] + \
                        [(backup / n, target / n) for n in reversed(moved_out)]:
            try:
                os.replace(src, dst)
            except OSError as undo_exc:
                failed.append(f"{src} -> {dst}: {undo_exc}")
        if failed:
            exc.add_note(f"restoring the previous checkpoint in {target} failed ({'; '.join(failed)}); its files "
                         f"are in {backup}")
            raise
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


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
    for auto_name, mapping_name in VISION_AUTO_CLASSES:
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


SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _has_file(path_or_repo_id, filename: str, kwargs: dict) -> bool:
    """Whether the local folder or Hub repo has ``filename`` (downloading it into the cache if it does)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        _resolve(path_or_repo_id, filename, kwargs)
        return True
    except (FileNotFoundError, EntryNotFoundError, LocalEntryNotFoundError):
        return False


def _exists_without_download(path_or_repo_id, filename: str, kwargs: dict) -> bool:
    subfolder = kwargs.get("subfolder") or ""
    if Path(path_or_repo_id).is_dir():
        return (Path(path_or_repo_id) / subfolder / filename).is_file()
    from huggingface_hub import file_exists

    try:
        return file_exists(str(path_or_repo_id), f"{subfolder}/{filename}" if subfolder else filename,
                           revision=kwargs.get("revision"), token=kwargs.get("token"))
    except Exception:  # offline or unreachable: the message below then names no pickle file
        return False


def _require_safetensors(path_or_repo_id, library: str, kwargs: dict) -> None:
    """Refuse a checkpoint without safetensors weights before anything is built (never ``torch.load``)."""
    names = (WEIGHTS_NAME, SAFETENSORS_INDEX_NAME) if library == "transformers" else (WEIGHTS_NAME,)
    if any(_has_file(path_or_repo_id, n, kwargs) for n in names):
        return
    pickled = [n for n in PICKLED_WEIGHTS if _exists_without_download(path_or_repo_id, n, kwargs)]
    found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights file"
    raise SpecError(f"{path_or_repo_id} has {found} and no {' or '.join(names)}. hf_prune loads safetensors "
                    "only: a pickle can run code when it is loaded. Fix: load the checkpoint once where you trust "
                    "it and re-save it with safetensors (hf_prune.save_pretrained(model, dir), or "
                    "model.save_pretrained(dir) with transformers' default safe_serialization=True).")


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
        if kwargs.get("use_safetensors", True) is not True:
            raise SpecError(f"AutoPrunedModel loads safetensors weights only (use_safetensors="
                            f"{kwargs['use_safetensors']!r} was given): pickled weights can run code when loaded")
        _require_safetensors(pretrained_model_name_or_path, library, kwargs)
        if library == "transformers":
            kwargs["use_safetensors"] = True  # transformers must never fall back to pytorch_model.bin
            return _load_transformers(pretrained_model_name_or_path, spec, config, kwargs)
        kwargs.pop("use_safetensors", None)
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


# create_model keywords that are not architecture arguments: they load files or replace the
# pretrained config. A checkpoint's model_args never reach timm with them.
_TIMM_LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                 "cache_dir", "scriptable", "exportable", "no_jit", "features_only", "feature_cfg",
                                 "pretrained_strict", "pretrained_model_args", "model_name", "device", "dtype"})
# pretrained_cfg keys that describe data (what base.describe_base records); file and URL keys are dropped.
_TIMM_OVERLAY_KEYS = ("tag", "hf_hub_id", "num_classes", "input_size", "fixed_input_size", "interpolation",
                      "crop_pct", "crop_mode", "mean", "std", "pool_size", "first_conv", "classifier", "license")


def _plain_data(value) -> bool:
    """Numbers, booleans, None, short words and (nested) lists/dicts of those: no paths, no URLs."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return "/" not in value and "\\" not in value and ":" not in value and len(value) <= 200
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def _timm_constructor_args(architecture: str) -> set:
    """Keyword arguments the model class of a timm architecture takes (its own and its bases' ``__init__``)."""
    import inspect

    import timm

    with torch.device("meta"):
        cls = type(timm.create_model(architecture, pretrained=False))
    names = set()
    for c in cls.__mro__:
        if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module:
            names.update(p.name for p in inspect.signature(c.__init__).parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    return names - _TIMM_LOADER_KWARGS


def safe_timm_args(architecture: str, model_args: dict, *, what: str = "model_args") -> dict:
    """``model_args`` read from a checkpoint, checked before they reach ``timm.create_model``.

    Only arguments of the architecture's model class pass, with plain-data values; loader keywords
    (``checkpoint_path``, ``pretrained_cfg_overlay``, ...) and strings that look like paths or URLs
    raise :class:`SpecError`. Lists become tuples (as timm records them).
    """
    if not isinstance(model_args, dict):
        raise SpecError(f"{what} must be an object, got {type(model_args).__name__}")
    allowed = _timm_constructor_args(architecture) if model_args else set()
    for key, value in model_args.items():
        if key not in allowed:
            why = "a loader option, not an architecture argument" if key in _TIMM_LOADER_KWARGS else \
                "not an argument of this architecture's model class"
            raise SpecError(f"{what} of timm '{architecture}' has {key!r} ({why}); hf_prune refuses it, since "
                            "loading must not open other files. Remove it from config.json")
        if not _plain_data(value):
            raise SpecError(f"{what}[{key!r}] = {value!r} of timm '{architecture}' is not plain data (numbers, "
                            "words, lists); paths and URLs are refused. Remove it from config.json")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}


def _timm_overlay(config: dict, spec: dict) -> dict:
    overlay = spec["base"]["config"].get("pretrained_cfg") or config.get("pretrained_cfg") or {}
    if not isinstance(overlay, dict):
        raise SpecError("pretrained_cfg in config.json must be an object")
    kept = {k: v for k, v in overlay.items() if k in _TIMM_OVERLAY_KEYS and _plain_data(v)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kept.items()}


def _load_timm(path, spec: dict, config: dict, kwargs: dict) -> nn.Module:
    import timm
    from safetensors.torch import load_model

    if config.get("architecture") not in (None, spec["base"]["architecture"]):
        raise SpecError(f"config.json says architecture {config.get('architecture')!r} but its hf_prune spec was made "
                        f"for {spec['base']['architecture']!r}")
    base = spec["base"]
    arch = base["architecture"]
    if not timm.is_model(arch.split(".")[0]):
        raise SpecError(f"timm {timm.__version__} has no architecture {arch!r} (a plain model name is required; "
                        "'hf-hub:' and 'local-dir:' sources are refused); a newer timm may be needed")
    args = safe_timm_args(arch, base["config"].get("model_args", {}))
    weights = _resolve(path, WEIGHTS_NAME, kwargs)
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=_timm_overlay(config, spec), **args)
    except TypeError:  # a timm whose factory takes no overlay for this model: the data config is informative
        model = timm.create_model(arch, pretrained=False, **args)
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
