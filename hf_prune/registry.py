"""The method registry: the one place that knows which pruning methods exist.

``register_method(name, config_cls, oneshot_fn, callback_cls)`` adds a method; :func:`hf_prune.prune`,
the callbacks' configs, the command line, the training program and the README's method table all
look methods up here, so a new method is one package plus one call::

    register_method("mymethod", MyConfig, "mypkg.oneshot:prune_mine", "mypkg.callback:MyCallback",
                    kind="weights", paper="...", example={"sparsity": 0.5})

``example`` holds settings that show the method on a small model (the contract tests use them);
``needs_calib`` says that one-shot pruning needs calibration data; ``trainer`` is the Trainer class
the callback trains with (a subclass when the method changes the loss, as SP's does).

``oneshot_fn(model, config, *, example_inputs=None, calib=None, **runtime) -> dict`` prunes
``model`` in place and returns its stats (``params_before``/``params_after``, ``macs_before``/
``macs_after``, ``sparsity``, ...); :func:`hf_prune.prune` validates the inputs, calls it and writes
the record. ``callback_cls`` is a :class:`hf_prune.trainer.PruningCallback`. Either may be given as a
``"module:attribute"`` string, resolved on first use, so registering stays cheap (callbacks import
transformers' Trainer).

The built-in methods live in ``hf_prune/methods/<name>/`` and register themselves when their
package is imported; the registry imports every package in that folder on first lookup.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

KINDS = ("structured", "depth", "weights")


@dataclass(frozen=True)
class Method:
    """A registered method. ``example``: settings that show the method on a small model (docs, tests)."""

    name: str
    config_cls: type
    oneshot: object
    callback: object
    kind: str = "structured"
    paper: str = ""
    summary: str = ""
    example: dict = field(default_factory=dict)
    needs_calib: bool = False
    trainer: object = "transformers:Trainer"

    def _resolve(self, ref):
        if isinstance(ref, str):
            module, _, attr = ref.partition(":")
            return getattr(importlib.import_module(module), attr)
        return ref

    @property
    def oneshot_fn(self):
        return self._resolve(self.oneshot)

    @property
    def callback_cls(self):
        return self._resolve(self.callback)

    @property
    def trainer_cls(self):
        """The Trainer class the callback trains with (a subclass when the method changes the loss)."""
        return self._resolve(self.trainer)


_METHODS: dict[str, Method] = {}
_BUILTINS_LOADED = False


def register_method(name: str, config_cls: type, oneshot_fn, callback_cls, *, kind: str = "structured",
                    paper: str = "", summary: str = "", example: dict | None = None, needs_calib: bool = False,
                    trainer="transformers:Trainer", replace: bool = False) -> Method:
    """Register a pruning method under ``name`` (see the module docstring); returns its entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"method name {name!r} must be an identifier (letters, digits, underscores)")
    if getattr(config_cls, "method", None) != name:
        raise ConfigError(f"{getattr(config_cls, '__name__', config_cls)!r}.method must be {name!r} (the config "
                          "class names the method it configures)")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not one of {KINDS}")
    if name in _METHODS and not replace and _METHODS[name].config_cls is not config_cls:
        raise ConfigError(f"a method named {name!r} is already registered; pass replace=True to override it")
    entry = Method(name, config_cls, oneshot_fn, callback_cls, kind=kind, paper=paper,
                   summary=summary or (config_cls.__doc__ or "").strip().split("\n")[0],
                   example=dict(example or {}), needs_calib=needs_calib, trainer=trainer)
    _METHODS[name] = entry
    return entry


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    folder = Path(__file__).with_name("methods")
    for pkg in sorted(p.name for p in folder.iterdir() if (p / "__init__.py").is_file()):
        importlib.import_module(f"{__package__}.methods.{pkg}")


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is an error listing the available ones."""
    _load_builtins()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]


def list_methods(kind: str | None = None) -> list[str]:
    """Names of the registered methods (of one ``kind``: structured, depth or weights)."""
    _load_builtins()
    return [n for n, m in _METHODS.items() if kind is None or m.kind == kind]


def methods_table() -> str:
    """A markdown table of the registered methods (the README's method table is this output)."""
    _load_builtins()
    rows = ["| method | kind | config | callback | paper |", "|---|---|---|---|---|"]
    for m in _METHODS.values():
        cb = m.callback.rsplit(":", 1)[-1] if isinstance(m.callback, str) else m.callback.__name__
        rows.append(f"| `{m.name}` | {m.kind} | `{m.config_cls.__name__}` | `{cb}` | {m.paper} |")
    return "\n".join(rows)
