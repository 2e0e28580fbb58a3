# Written by hf_prune. Loads this pruned model with plain transformers, without hf_prune:
#
#     from transformers import AutoModelForImageClassification
#     model = AutoModelForImageClassification.from_pretrained("<this repo>", trust_remote_code=True)
#
# The model class below is the transformers class of the base model; its __init__ builds the base
# and then resizes it to the pruned structure recorded in config.json under "hf_prune" (format v1).
# transformers then loads the safetensors weights into it, strictly (shapes must match).
import torch
from torch import nn

HF_PRUNE_FORMAT_VERSION = 1


class HfPruneSpecError(ValueError):
    """The hf_prune structure spec in config.json does not fit this model."""


class PassThrough(nn.Module):
    """Stands in for a removed block: returns its first input unchanged."""

    def forward(self, x, *args, **kwargs):
        return x


def _decode(value, like):
    if not isinstance(value, list):
        return value
    likes = list(like) if isinstance(like, (tuple, list)) and len(like) == len(value) else [None] * len(value)
    items = [_decode(v, w) for v, w in zip(value, likes)]
    if isinstance(like, torch.Size):
        return torch.Size(items)
    if isinstance(like, list):
        return items
    return tuple(items)


def apply_hf_prune_spec(model, spec):
    """Resize a freshly built base model in place to the structure recorded in ``spec``."""
    if not isinstance(spec, dict) or spec.get("format_version") != HF_PRUNE_FORMAT_VERSION:
        version = spec.get("format_version") if isinstance(spec, dict) else None
        raise HfPruneSpecError(f"unsupported hf_prune format_version {version!r}; this loader reads "
                               f"{HF_PRUNE_FORMAT_VERSION}. Install hf_prune to load this checkpoint.")
    if spec.get("merged_blocks"):
        raise HfPruneSpecError("this checkpoint has merged blocks; install hf_prune to load it")
    modules = list(model.named_modules())

    def lookup(entry, where):
        i = entry["index"]
        if not 0 <= i < len(modules):
            raise HfPruneSpecError(f"{where} ('{entry['path']}'): index {i} is out of range")
        path, module = modules[i]
        names = {c.__name__ for c in type(module).__mro__}
        if path != entry["path"] or entry["type"] not in names:
            raise HfPruneSpecError(f"{where}: expected a {entry['type']} at '{entry['path']}' (module #{i}) but "
                                   f"found a {type(module).__name__} at '{path}'")
        return module

    plan = []
    for n, entry in enumerate(spec.get("layers", [])):
        module = lookup(entry, f"layers[{n}]")
        own = {**module._parameters, **module._buffers}
        for name, shape in entry["tensors"].items():
            want = entry.get("base_tensors", {}).get(name)
            if own.get(name) is None or (want is not None and list(own[name].shape) != want):
                raise HfPruneSpecError(f"layers[{n}] ('{entry['path']}.{name}') does not match the base model")
        for name in entry["attrs"]:
            if name.startswith("_") or name in own or name in module._modules:
                raise HfPruneSpecError(f"layers[{n}] ('{entry['path']}'): invalid attribute '{name}'")
        plan.append((entry, module))
    removals = [lookup(entry, f"removed_blocks[{n}]") and entry
                for n, entry in enumerate(spec.get("removed_blocks", []))]

    for entry, module in plan:
        for name, shape in entry["tensors"].items():
            old = module._parameters[name] if name in module._parameters else module._buffers[name]
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[name] = new
        for name, value in entry["attrs"].items():
            setattr(module, name, _decode(value, getattr(module, name, None)))
    by_path = dict(model.named_modules())
    for entry in removals:
        parent_path, _, child = entry["path"].rpartition(".")
        by_path[parent_path]._modules[child] = PassThrough()
    return model


def own_memory(model):
    """Copy CPU tensors memory-mapped from the weights file (maybe unaligned) into own memory.

    Kernels may take other code paths on unaligned data; with this, outputs are bitwise identical
    to those of the model that was saved.
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
