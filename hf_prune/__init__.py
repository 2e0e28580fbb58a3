"""hf_prune: prune vision models from timm / transformers and publish them on the Hugging Face Hub.

The public API is imported lazily so that ``import hf_prune`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # one-shot pruning and the method protocol
    "prune": "hf_prune.api",
    "compact": "hf_prune.api",
    "register_method": "hf_prune.registry",
    "list_methods": "hf_prune.registry",
    "PruningConfig": "hf_prune.config",
    "DepGraphConfig": "hf_prune.methods.depgraph.config",
    "UPDPConfig": "hf_prune.methods.updp.config",
    "StageWiseConfig": "hf_prune.methods.stagewise.config",
    "RDConfig": "hf_prune.methods.rd.config",
    "OViTConfig": "hf_prune.methods.ovit.config",
    "MagnitudeConfig": "hf_prune.methods.magnitude.config",
    "PruningError": "hf_prune.errors",
    "ConfigError": "hf_prune.errors",
    # the engine
    "DependencyGraph": "hf_prune.engine.graph",
    "StructuredPruner": "hf_prune.engine.pruner",
    "profile": "hf_prune.metrics.profiling",
    # the Hub
    "save_pretrained": "hf_prune.hub",
    "push_to_hub": "hf_prune.hub",
    "AutoPrunedModel": "hf_prune.hub",
    "enable_pipeline": "hf_prune.hub.auto",
    # deployment and analysis
    "export_onnx": "hf_prune.export",
    "ExportError": "hf_prune.export",
    "sensitivity": "hf_prune.sensitivity",
    "SensitivityReport": "hf_prune.sensitivity",
    # training
    "PruningCallback": "hf_prune.trainer.callback",
    "DepGraphCallback": "hf_prune.methods.depgraph.callback",
    "UPDPCallback": "hf_prune.methods.updp.callback",
    "UPDPSupernetCallback": "hf_prune.methods.updp.callback",
    "DepthSupernet": "hf_prune.methods.updp.search",
    "StageWiseTrainer": "hf_prune.methods.stagewise.callback",
    "StageWiseCallback": "hf_prune.methods.stagewise.callback",
    "RDCallback": "hf_prune.methods.rd.callback",
    "OViTCallback": "hf_prune.methods.ovit.callback",
    "MagnitudeCallback": "hf_prune.methods.magnitude.callback",
    "staged_finetune": "hf_prune.trainer.staged",
    "DistillationTrainer": "hf_prune.trainer.distill",
    "LRRestartsCallback": "hf_prune.trainer.restarts",
    # recovery of pretrained models
    "recover": "hf_prune.recovery",
    "dense_teacher": "hf_prune.recovery",
    "reconstruct": "hf_prune.engine.reconstruct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_prune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
