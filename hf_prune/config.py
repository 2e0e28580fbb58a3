"""Typed method settings: :class:`PruningConfig`, the base of every method's config dataclass.

A config holds what a method needs to know to reproduce a pruned model (targets, criteria,
schedules), never data or modules: example inputs, calibration batches and teachers are passed
to :func:`hf_prune.prune` or the callback next to it. The same object is accepted by
``hf_prune.prune(model, config)``, by the method's callback (``UPDPCallback(config)``), by the
command line (``--config file.json``) and is recorded in the saved model's spec under
``method.settings``, so ``prune(model, PruningConfig.from_pretrained("user/pruned-vit"))``
reproduces a published model's settings.

Validation lives in one place: every subclass's :meth:`PruningConfig.validate` runs when the config
is built (and on :meth:`replace`), through the checks in :mod:`hf_prune.core.checks`, and raises
:class:`~hf_prune.errors.ConfigError` naming the field, the value and the valid range.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError

CONFIG_NAME = "hf_prune_config.json"


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _tupled(value):
    """Lists (from JSON) back to tuples, recursively: configs hold tuples so that they compare equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


@dataclasses.dataclass
class PruningConfig:
    """Settings of one pruning method. Subclasses are dataclasses with a default for every field.

    ``method`` (a class attribute) is the name the method is registered under.
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _tupled(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Check every field (subclasses extend it and call ``super().validate()``)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _check_keys(cls, keys) -> None:
        names = cls.field_names()
        unknown = [k for k in keys if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=2) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {v}?" for k, v in hints.items() if v)
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}" + (f" ({hint})" if hint else "")
                              + f"; its fields are {names}")

    @classmethod
    def build(cls, config=None, **fields) -> "PruningConfig":
        """A ``cls`` from a config object, a dict, or keyword fields (fields override the config's)."""
        if config is None:
            cls._check_keys(fields)
            return cls(**fields)
        if isinstance(config, Mapping):
            config = cls.from_dict(config)
        if not isinstance(config, cls):
            raise ConfigError(f"expected a {cls.__name__} (method {cls.method!r}), got a {type(config).__name__}"
                              + (f" for method {config.method!r}" if isinstance(config, PruningConfig) else ""))
        return config.replace(**fields) if fields else config

    def replace(self, **changes) -> "PruningConfig":
        """A copy with ``changes`` applied and validated."""
        self._check_keys(changes)
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict:
        """JSON-able settings, with ``"method"`` first."""
        return {"method": self.method, **{f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PruningConfig":
        """The config ``data`` describes; on the base class the ``"method"`` key picks the subclass."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object / dict, got a {type(data).__name__}")
        data = dict(data)
        name = data.pop("method", None)
        target = cls
        if cls is PruningConfig or (name is not None and name != cls.method):
            if name is None:
                raise ConfigError("the config has no 'method' key, so its method is unknown; add e.g. "
                                  "\"method\": \"depgraph\"")
            from .registry import get_method

            target = get_method(name).config_cls
            if cls is not PruningConfig and not issubclass(target, cls):
                raise ConfigError(f"the config is for method {name!r}, not {cls.method!r}")
        target._check_keys(data)
        return target(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``hf_prune_config.json`` into ``save_directory`` (atomically) and return its path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> "PruningConfig":
        """Read a config from a file, a directory or a Hub repo.

        A directory or repo may hold ``hf_prune_config.json`` (written by :meth:`save_pretrained`) or be
        a pruned model saved by hf_prune: its ``config.json`` records the settings it was pruned with.
        ``hub_kwargs`` (``revision``, ``token``, ...) go to ``huggingface_hub.hf_hub_download``.
        """
        path = Path(path_or_repo_id)
        if path.is_file():
            return cls.from_dict(_read_json(path))
        for name in (CONFIG_NAME, "config.json"):
            found = _find(path_or_repo_id, name, hub_kwargs)
            if found is None:
                continue
            data = _read_json(found)
            if name == "config.json":
                spec = data.get("hf_prune")
                if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), Mapping) \
                        or not spec["method"].get("name"):
                    raise ConfigError(f"{found} is not an hf_prune checkpoint (no 'hf_prune.method' in it), and "
                                      f"there is no {CONFIG_NAME} next to it")
                data = {"method": spec["method"]["name"], **(spec["method"].get("settings") or {})}
            return cls.from_dict(data)
        raise ConfigError(f"no {CONFIG_NAME} or hf_prune config.json found in {path_or_repo_id!r}")


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save it with PruningConfig.save_pretrained") from exc


def _find(path_or_repo_id, filename: str, hub_kwargs: dict):
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(str(path_or_repo_id), filename, **hub_kwargs)
    except EntryNotFoundError:
        return None


@dataclasses.dataclass
class ScheduleConfig(PruningConfig):
    """Fields of methods that prune gradually during training on a sparsity schedule.

    ``schedule``: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"oneshot"`` or ``"geometric"`` (RD's rounds,
    see :class:`~hf_prune.core.schedules.Geometric`); ``start`` / ``end``: where
    pruning starts and reaches the final target (fractions of training as floats, optimizer steps as
    ints); ``frequency``: prune every this many steps in between; ``initial``: amount pruned at ``start``.
    One-shot pruning (:func:`hf_prune.prune`) ignores them.
    """

    schedule: str = "cubic"
    start: float = 0.0
    end: float = 0.7
    frequency: int = 1
    initial: float = 0.0

    def schedule_options(self) -> dict:
        """Extra arguments of :func:`~hf_prune.core.schedules.make_schedule` a method's fields set."""
        return {}

    def make_schedule(self, kind: str, target: float | None = None):
        """The :class:`~hf_prune.core.schedules.SparsitySchedule` these fields describe for ``kind``
        (``"target_macs"`` or ``"sparsity"``), ending at ``target`` (default: the config's field)."""
        from .core.schedules import make_schedule

        value = getattr(self, kind) if target is None else target
        try:
            return make_schedule(self.schedule, start=self.start, end=self.end, frequency=self.frequency,
                                 initial=self.initial, **self.schedule_options(), **{kind: value})
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
