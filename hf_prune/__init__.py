"""hf_prune: prune vision models from timm / transformers and publish them on the Hugging Face Hub.

The public API is imported lazily so that ``import hf_prune`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "hf_prune.api",
    "compact": "hf_prune.engine.pruner",
    "PruningError": "hf_prune.errors",
    "DependencyGraph": "hf_prune.engine.graph",
    "StructuredPruner": "hf_prune.engine.pruner",
    "profile": "hf_prune.metrics.profiling",
    "save_pretrained": "hf_prune.hub",
    "push_to_hub": "hf_prune.hub",
    "AutoPrunedModel": "hf_prune.hub",
    "PruningCallback": "hf_prune.trainer.callback",
    "DepGraphCallback": "hf_prune.trainer.callback",
    "UPDPCallback": "hf_prune.methods.updp.callback",
    "UPDPSupernetCallback": "hf_prune.methods.updp.callback",
    "DepthSupernet": "hf_prune.methods.updp.search",
    "staged_finetune": "hf_prune.trainer.staged",
    "StageWiseTrainer": "hf_prune.methods.stagewise.callback",
    "StageWiseCallback": "hf_prune.methods.stagewise.callback",
    "RDCallback": "hf_prune.methods.rd.curves",
    "OViTCallback": "hf_prune.methods.ovit.obs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_prune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
