"""Pruning methods (one module per paper). Imported lazily: ``from hf_prune.methods import prune_depth``.

* UPDP (depth pruning with exact block merging): :mod:`hf_prune.methods.updp` (one-shot
  ``prune_depth``, ``UPDPAnnealer`` for any loop), :mod:`hf_prune.methods.updp_callback`
  (``UPDPCallback`` for ``transformers.Trainer``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prune_depth": "hf_prune.methods.updp",
    "updp_prune": "hf_prune.methods.updp",
    "find_blocks": "hf_prune.methods.updp",
    "UPDPAnnealer": "hf_prune.methods.updp",
    "UPDPCallback": "hf_prune.methods.updp_callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_prune.methods' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
