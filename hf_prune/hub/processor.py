"""The image processor a pruned checkpoint carries, so that ``pipeline(...)`` can use it.

Pruning changes widths, not what the model expects as input: the processor of the unpruned model
is the right one. This module finds it and writes it next to the pruned weights.

* transformers models: the processor saved with the model they were loaded from
  (``config._name_or_path``, then the spec's base repo), found in the local folder or Hub cache
  first and on the Hub only when that fails and the Hub can be reached;
* ``TimmWrapperForImageClassification``: a ``TimmWrapperImageProcessor`` built from timm's data
  config (``timm.data.resolve_model_data_config``, or the wrapper's own ``config.pretrained_cfg``
  when it was loaded with one); plain timm models: that data config itself (the dict
  ``timm.data.create_transform`` takes), so saving them does not import transformers. timm and
  transformers both read it from ``config.json``'s ``pretrained_cfg``: that is where it is written.

A processor that cannot be found never fails a save: it warns, naming where it looked and how to
pass one (``image_processor=``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from torch import nn

__all__ = ["image_processor_for", "save_processor", "timm_data_config", "timm_processor", "PROCESSOR_FILE",
           "TIMM_DATA_KEYS"]

PROCESSOR_FILE = "preprocessor_config.json"
# The pretrained_cfg keys timm's data config is resolved from (and the ones it returns).
TIMM_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def image_processor_for(model: nn.Module, image_processor=None, *, source: str | None = None):
    """The image processor to save with ``model``, or None (with a warning) when none is known.

    ``image_processor``: the user's processor (a transformers image processor or a timm data
    config dict), or a local folder / Hub id to load one from; it wins over any lookup.
    ``source``: one more place to look (e.g. the spec's base repo) after the folder or repo the
    model was loaded from.
    """
    from .base import library_of

    if image_processor is not None:
        return _given(image_processor)
    if library_of(model) == "timm":
        return timm_data_config(model)
    if _is_timm_wrapper(model):
        return timm_processor(model)
    candidates = [getattr(getattr(model, "config", None), "_name_or_path", None), source]
    candidates = list(dict.fromkeys(str(c) for c in candidates if c))
    for candidate in candidates:
        found = _load(candidate)
        if found is not None:
            return found
    where = f"in {', '.join(repr(c) for c in candidates)}" if candidates else (
        "anywhere: the model was built from a config, not loaded from a folder or repo")
    warnings.warn(f"no image processor found for this {type(model).__name__} {where}; the checkpoint is saved "
                  "without preprocessor_config.json, so pipeline('image-classification', ...) cannot use it. Pass "
                  "image_processor=AutoImageProcessor.from_pretrained(<the base model>) (or an image processor you "
                  "built) to save one.", UserWarning, stacklevel=3)
    return None


def timm_data_config(model: nn.Module) -> dict:
    """timm's data config (input size, interpolation, mean, std, crop) of a timm or TimmWrapper model."""
    import timm

    if not _is_timm_wrapper(model):
        return dict(timm.data.resolve_model_data_config(model))
    # A TimmWrapper builds its timm model with timm's defaults; the checkpoint's own data config
    # (config.json's pretrained_cfg, as in timm's Hub repos) is on its config.
    own = getattr(model.config, "pretrained_cfg", None)
    return dict(timm.data.resolve_data_config(pretrained_cfg=dict(own)) if own
                else timm.data.resolve_model_data_config(model.timm_model))


def timm_processor(model: nn.Module):
    """A ``TimmWrapperImageProcessor`` with the data config of a timm or TimmWrapper model."""
    from transformers import TimmWrapperImageProcessor

    net = model.timm_model if _is_timm_wrapper(model) else model
    arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or getattr(
        getattr(model, "config", None), "architecture", None)
    return TimmWrapperImageProcessor(pretrained_cfg=timm_data_config(model), architecture=arch)


def save_processor(processor, directory: str | os.PathLike) -> Path | None:
    """Write ``processor`` into the saved checkpoint ``directory``; returns the file written (or None).

    transformers processors write ``preprocessor_config.json``. A ``TimmWrapperImageProcessor``
    or a timm data config is merged into ``config.json``'s ``pretrained_cfg``, where timm and
    transformers read it (``TimmWrapperImageProcessor.save_pretrained`` deliberately writes nothing).
    """
    if processor is None:
        return None
    directory = Path(directory)
    timm_data = processor if isinstance(processor, dict) else getattr(processor, "data_config", None)
    if isinstance(timm_data, dict):
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in timm_data.items() if k in TIMM_DATA_KEYS}
        config["pretrained_cfg"] = {**(config.get("pretrained_cfg") or {}), **data}
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return config_file
    processor.save_pretrained(str(directory))
    return directory / PROCESSOR_FILE


def _is_timm_wrapper(model: nn.Module) -> bool:
    return hasattr(model, "timm_model") and getattr(getattr(model, "config", None), "model_type", "").endswith(
        "timm_wrapper")


def _given(image_processor):
    if isinstance(image_processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(image_processor))
    if isinstance(image_processor, dict):
        if not set(image_processor) & set(TIMM_DATA_KEYS):
            raise TypeError(f"an image_processor dict must be a timm data config (keys among {TIMM_DATA_KEYS}), "
                            f"got keys {sorted(image_processor)}")
        return image_processor
    if not (callable(getattr(image_processor, "save_pretrained", None)) or hasattr(image_processor, "data_config")):
        raise TypeError(f"image_processor must be a transformers image processor (with save_pretrained), a timm "
                        f"data config, a local folder or a Hub id, got {type(image_processor).__name__}")
    return image_processor


def _load(source: str):
    """The processor saved in a local folder or Hub repo: the cache first, the Hub only if that fails."""
    from transformers import AutoImageProcessor

    tries = [{"local_files_only": True}]
    if not os.path.isdir(source) and _on_hub(source):
        tries.append({})
    for kwargs in tries:
        try:
            return AutoImageProcessor.from_pretrained(source, **kwargs)
        except Exception:  # noqa: BLE001  (missing file, unknown repo, no network: all mean "not found here")
            continue
    return None


def _on_hub(repo_id: str) -> bool:
    """Whether the Hub repo has a processor file. One request without retries: without a network a
    save loses a fraction of a second here, where the downloader's retries would take minutes."""
    from huggingface_hub import constants, file_exists

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(repo_id, PROCESSOR_FILE)
    except Exception:  # noqa: BLE001  (no network, invalid id, private repo)
        return False
