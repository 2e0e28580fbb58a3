"""Public entry points: :func:`prune` (one-shot, any registered method) and :func:`compact`.

``prune`` looks the method up in :mod:`hf_prune.registry`, builds its config (a
:class:`~hf_prune.config.PruningConfig` subclass) from the given config and/or fields, runs the
method's one-shot function and writes the method record (and, for transformers models, the structure
spec) onto the model. Every method is transactional: on failure the model is unchanged and the error
says what went wrong and what to do.
"""
from __future__ import annotations

import inspect

from torch import nn

from .config import PruningConfig
from .core.record import attach_spec, write_record
from .engine.pruner import compact as compact_masks
from .engine.pruner import resolve_layers
from .errors import ConfigError, PruningError
from .registry import get_method

__all__ = ["prune", "oneshot", "compact", "PruningError"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")


def _check_options(entry, oneshot, runtime: dict) -> None:
    params = inspect.signature(oneshot).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in runtime if k not in params)
    if unknown:
        options = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                   and n not in ("example_inputs", "calib")]
        raise ConfigError(f"{unknown} are neither fields of {entry.config_cls.__name__} "
                          f"({entry.config_cls.field_names()}) nor options of method {entry.name!r} ({options})")


def prune(model: nn.Module, config: PruningConfig | str | dict | None = None, /, *, method: str | None = None,
          example_inputs=None, calib=None, **options) -> nn.Module:
    """Prune ``model`` in place with a registered method and return it.

    ``config``: a method config (``DepGraphConfig(target_macs=0.5)``, ``PruningConfig.from_pretrained(repo)``),
    its dict, or a method name; ``method=`` names the method instead (default ``"depgraph"``). Other keyword
    arguments are the config's fields (``target_macs=0.5``, ``num_blocks=3``, ``sparsity=0.6``, ...; they
    override a given config's) or options of the method's one-shot function (``compact=False`` keeps masks
    for DepGraph, ``loss_fn=`` for Taylor/oViT gradients, ...). ``example_inputs``: a batch to trace with (a
    tensor, a tuple, or a dict of keyword inputs).
    Methods: :func:`hf_prune.list_methods` (``depgraph``, ``updp``, ``stagewise``, ``rd``, ``ovit``,
    ``magnitude``). The method record (``{"method", "settings", "stats"}``) is written onto the model.

    ``calib``, calibration data for the methods that need it (``rd``, ``ovit``, ``stagewise``; ``depgraph``
    with ``importance="taylor"``), is an iterable of batches — a list or a ``torch.utils.data.DataLoader`` —
    where each batch is a dict ``{"pixel_values": x, "labels": y}`` (``"label"`` works too; other keys are
    passed to the model) or an ``(x, y)`` pair; a list of one batch for one batch. Labels are needed by what
    computes a loss or an accuracy (``ovit``, ``stagewise``, Taylor); ``rd``'s distortion curves take bare
    input tensors too. Every method reads only the first few batches, so a whole training DataLoader is fine:
    ``rd`` reads ``max_batches`` (default 16), ``ovit`` ``num_grads`` (default 256, one gradient per batch; a
    shorter ``calib`` gives fewer gradients), ``stagewise`` ``calib_batches`` (default 8), Taylor importance 8.
    Given to ``depgraph`` (and ``stagewise``), ``calib`` also re-fits the pruned layers towards the dense model
    (``reconstruct=False`` skips it): what keeps a pretrained model usable after one-shot pruning.
    """
    config, stats = oneshot(model, config, method=method, example_inputs=example_inputs, calib=calib, **options)
    write_record(model, config, stats)
    return model


def oneshot(model: nn.Module, config: PruningConfig | str | dict | None = None, /, *, method: str | None = None,
            example_inputs=None, calib=None, **options) -> tuple[PruningConfig, dict]:
    """:func:`prune` without the record: returns the config used and everything the method measured
    (per-layer sparsities, the allocation, the proxy accuracy of a search, ...)."""
    _check_model(model)
    if isinstance(config, str):
        if method is not None and method != config:
            raise ConfigError(f"prune(model, {config!r}, method={method!r}): two different methods")
        method, config = config, None
    if isinstance(config, PruningConfig):
        if method is not None and method != config.method:
            raise ConfigError(f"the config is for method {config.method!r}, not method={method!r}")
        method = config.method
    elif isinstance(config, dict):
        method = method or config.get("method")
    entry = get_method(method or "depgraph")
    fields = {k: v for k, v in options.items() if k in entry.config_cls.field_names()}
    runtime = {k: v for k, v in options.items() if k not in fields}
    if "ignored_layers" in runtime and "exclude" in entry.config_cls.field_names():  # the weight methods' name
        fields["exclude"] = tuple(fields.get("exclude", ())) + resolve_layers(model, runtime.pop("ignored_layers"))
    if "ignored_layers" in fields:
        fields["ignored_layers"] = resolve_layers(model, fields["ignored_layers"])
    cfg = entry.config_cls.build(config, **fields)
    run = entry.oneshot_fn
    _check_options(entry, run, runtime)
    return cfg, run(model, cfg, example_inputs=example_inputs, calib=calib, **runtime)


def compact(model: nn.Module) -> nn.Module:
    """Physically remove what masks removed (``prune(..., compact=False)``); the outputs stay the same."""
    compact_masks(model)
    attach_spec(model)
    return model
