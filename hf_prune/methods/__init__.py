"""Pruning methods, one module per paper (imported lazily: ``from hf_prune.methods import prune_depth``).

* UPDP (depth pruning with exact block merging): :mod:`.updp` (one-shot ``prune_depth``,
  ``UPDPAnnealer``), :mod:`.updp_search` (depth supernet and subnet search), :mod:`.updp_callback`
  (``UPDPCallback``, ``UPDPSupernetCallback``).
* SP (stage-wise width supernet and search): :mod:`.stagewise`, :mod:`.stagewise_trainer`
  (``StageWiseTrainer``, ``StageWiseCallback``).
* Weight pruning: :mod:`.weight_allocation` (layer allocation x within-layer selection),
  :mod:`.rd` (RD curves and dynamic program, ``RDCallback``), :mod:`.ovit` (OBS, ``OViTCallback``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prune_depth": "hf_prune.methods.updp.depth",
    "updp_prune": "hf_prune.methods.updp.depth",
    "find_blocks": "hf_prune.methods.updp.depth",
    "UPDPAnnealer": "hf_prune.methods.updp.depth",
    "UPDPCallback": "hf_prune.methods.updp.callback",
    "UPDPSupernetCallback": "hf_prune.methods.updp.callback",
    "DepthSupernet": "hf_prune.methods.updp.search",
    "prune_stagewise": "hf_prune.methods.stagewise.supernet",
    "StageWiseTrainer": "hf_prune.methods.stagewise.callback",
    "StageWiseCallback": "hf_prune.methods.stagewise.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_prune.methods' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
