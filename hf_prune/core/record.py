"""The one writer of what a pruning run leaves on a model: the method record and the structure spec.

Every path that prunes — :func:`hf_prune.prune` and every callback's end of training — calls
:func:`write_record`. It stores ``{"method", "settings", "stats"}`` on the model (read by
:func:`hf_prune.save_pretrained` and the model card) and, for models with a transformers config, puts
the structure spec on ``model.config.hf_prune`` and marks the config as a pruned one
(:func:`hf_prune.hub.base.mark_pruned`), so that ``model.save_pretrained``, ``trainer.save_model`` and
``Trainer.push_to_hub`` write checkpoints that ``hf_prune.AutoPrunedModel`` reloads exactly and that
plain transformers Auto classes refuse instead of loading a different model.
"""
from __future__ import annotations

import math
import warnings

from torch import nn

RECORD_ATTR = "hf_prune_record"


def _clean_stats(stats: dict) -> dict:
    """Finite numbers, and the measured ``speed`` (a dict of numbers and names) that reports and cards show."""
    out = {k: v for k, v in (stats or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    speed = (stats or {}).get("speed")
    if isinstance(speed, dict):
        out["speed"] = {k: v for k, v in speed.items() if isinstance(v, (str, int, float, type(None)))
                        and not (isinstance(v, float) and not math.isfinite(v))}
    return out


def write_record(model: nn.Module, config, stats: dict) -> dict:
    """Record that ``model`` was pruned with ``config`` (a :class:`~hf_prune.config.PruningConfig`)."""
    settings = config.to_dict()
    name = settings.pop("method")
    record = {"method": name, "settings": settings, "stats": _clean_stats(stats)}
    model.__dict__[RECORD_ATTR] = record
    attach_spec(model)
    return record


def read_record(model: nn.Module) -> dict | None:
    return model.__dict__.get(RECORD_ATTR)


def attach_spec(model: nn.Module) -> None:
    """Put the structure spec of ``model`` (with its record) on ``model.config`` (transformers models).

    A model that still carries masks gets it when it is compacted (:func:`hf_prune.compact`).
    """
    config = getattr(model, "config", None)
    record = read_record(model)
    if config is None or not hasattr(config, "to_dict") or record is None:
        return
    from ..engine.masks import get_mask

    if get_mask(model) is not None:
        return
    from ..hub.base import mark_pruned
    from ..hub.spec import SpecError, structure_spec

    try:
        config.hf_prune = structure_spec(model, method=record["method"], settings=record["settings"],
                                         stats=record["stats"])
    except SpecError as exc:
        warnings.warn(f"the pruned structure cannot be recorded on model.config ({exc}); the model works, but "
                      "saving it will not give a loadable checkpoint", stacklevel=3)
        return
    mark_pruned(config)


def copy_record(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the record and structure spec of ``src`` (a finished full-shape copy of it).

    Sharded training finalizes on a full copy; the sharded model keeps its training form, so its own
    saves must carry the same spec: they then load exactly (same structure) or are refused by the
    loader (a structure that was compacted or merged) instead of loading as a different model.
    """
    record = read_record(src)
    if record is None:
        return
    dst.__dict__[RECORD_ATTR] = record
    spec = getattr(getattr(src, "config", None), "hf_prune", None)
    config = getattr(dst, "config", None)
    if spec is not None and config is not None and config is not getattr(src, "config", None):
        from ..hub.base import mark_pruned

        config.hf_prune = spec
        mark_pruned(config)
