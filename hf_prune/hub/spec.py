"""The structure spec (format v1): what makes a pruned model differ from its freshly built base.

A pruned model has layers of different widths, fewer heads, maybe missing blocks and zeroed
weights; a transformers config or a timm ``model_args`` cannot express that. The spec is a plain
JSON object stored in ``config.json`` under the key ``hf_prune``. Loading = build the base
architecture from its config, :func:`apply_spec`, then load the safetensors weights strictly.
Nothing is pickled and no code is named in the file.

Format v1::

    {
      "format_version": 1,
      "base": {                                   # what to build before applying the spec
        "library": "transformers" | "timm",
        "architecture": "ViTForImageClassification" | "vit_tiny_patch16_224",
        "config": {...},                          # transformers: config.to_diff_dict() (informative:
                                                  #   config.json itself is what loading uses);
                                                  # timm: {"model_args": {create_model kwargs},
                                                  #   "pretrained_cfg": {mean, std, input_size, ...}}
        "source": "google/vit-base-patch16-224"   # Hub repo of the unpruned weights, or null
      },
      "layers": [                                 # modules that differ from the base, in module order
        {
          "index": 9,                             # position in list(base.named_modules()) (the key)
          "path": "vit.layers.0.attention.q_proj",# module path (checked, not used as key)
          "type": "Linear",                       # class name (checked against the class or its bases)
          "role": "linear",                       # linear | conv | norm | embedding | attention | other
          "tensors": {"weight": [16, 64], "bias": [16]},      # new shapes of its own params/buffers
          "base_tensors": {"weight": [64, 64], "bias": [64]}, # their shapes in the base (checked)
          "attrs": {"out_features": 16}           # shape-bearing attributes that changed
        }, ...
      ],
      "removed_blocks": [                         # blocks replaced by a pass-through (depth pruning)
        {"index": 40, "path": "vit.layers.5", "type": "ViTLayer"}
      ],
      "merged_blocks": [                          # blocks depth pruning (UPDP) merged into fewer layers
        {"index": 12, "path": "stages.2.blocks.4", "type": "ConvNeXtBlock",
         "became": {"type": "UPDPMergedBlock", "layout": "nchw", "body": [...], "shortcut": ..., "act": ...}}
      ],
      "sparsity": {} | {                          # unstructured zeros (informative)
        "global_nonzero": 0.5,                    # nonzero fraction over all weights with ndim >= 2
        "layers": [{"index": 9, "path": "...", "tensor": "weight", "nonzero": 0.5}, ...]
      },                                          # (listed: tensors with more than 1% zeros)
      "method": {"name": "depgraph", "settings": {"target_macs": 0.6, ...}},
      "stats": {"params_before": 5.7e6, "params_after": 3.1e6, "macs_before": ..., "macs_after": ...,
                "speed": {"latency_ratio": 0.5, "speedup": 2.0, "device": "...", "batch_size": 1, "dtype": "float32"}},
      "versions": {"torch": "2.14.1", "transformers": "5.23.0", "timm": "1.0.31", "hf_prune": "0.1.0"}
    }

Rules:

* The base is what the saved config builds, not necessarily the dense model: compaction updates a
  transformers config's uniform fields (``num_attention_heads``, ``intermediate_size``, ...), so
  the spec holds what the config cannot say (e.g. ``head_dim``/``scaling`` when heads were cut).
  ``stats.params_before`` is therefore computed only for timm (whose ``model_args`` pruning leaves
  alone); for transformers it is recorded when the caller passes it.
* Entries are keyed by ``index`` (the module's position in ``list(base.named_modules())``, default
  de-duplication), never by parameter name: transformers renames some parameters on save (ViT's
  legacy names), so names in the weights file differ from module names.
* ``path`` and ``type`` must agree with the module found at ``index`` in the freshly built base
  (``type`` may name the class or any of its base classes), and each tensor's current shape must
  equal ``base_tensors`` when given; otherwise :class:`SpecError` names the entry. A wrong base
  config therefore fails before any weight is read.
* ``tensors`` lists only direct parameters/buffers (``recurse=False``) whose shape differs.
  Applying replaces each with an uninitialised tensor of the recorded shape, keeping dtype, device,
  ``requires_grad`` and buffer persistence; the weights file then fills it.
* ``attrs`` lists public instance attributes that are numbers or (nested) tuples/lists of numbers
  and differ from the base (``out_features``, ``num_heads``, ``attn_dim``, ``normalized_shape``,
  ``(C, 1, 1)`` broadcast shapes, ...). JSON lists are turned back into the container type the base
  attribute has (tuple, list, ``torch.Size``). Only attributes the base module has, and only those
  on the allow-list below, may appear.
* ``removed_blocks``: the module at ``path`` is replaced by :class:`PassThrough`, which returns its
  first input unchanged; its descendants are gone (no entry may point inside it).
* ``merged_blocks``: the module at ``path`` is replaced by the merged block that ``became``
  describes (layer types and shapes, no weights; see ``hf_prune.methods.updp.merge.MergedBlock``);
  its descendants are gone.
* A reader raises :class:`SpecError` on a ``format_version`` it does not know, on malformed fields,
  on unknown keys (top level and inside every entry) and on non-empty fields it cannot apply,
  before building anything.
* Only what compaction writes may be set (:func:`check_attr`): per module type, ``in/out_features``
  (Linear), ``in/out_channels`` and ``groups`` (convolutions), ``num_features`` (BatchNorm),
  ``num_groups``/``num_channels`` (GroupNorm), ``embedding_dim`` (Embedding); on other modules
  head counts, head widths, head sizes, ``scaling``/``scale`` (which must stay ``head_dim ** -0.5``
  where the base follows that rule), ``normalized_shape`` and per-channel shape tuples such as
  ``(C, 1, 1)``. Integers are integers, never above the bound below, ``groups`` at least 1.
* Sizes are bounded before anything is allocated: a tensor keeps its number of dimensions and no
  dimension grows past its size in the base. For transformers bases the bound is the larger of
  that and the widest dimension (element count: the largest tensor) of the base model, because
  compaction makes a transformers config follow uniform pruned widths, so a base built from it can
  be narrower than the pruned model where a width is derived (``head_dim = hidden / heads``,
  Segformer's last stage). A merged block may not be larger than the block it replaces (widths,
  kernel sizes, total size).
"""
from __future__ import annotations

import json
import math
import re

import torch
from torch import nn

from ..errors import SpecError

from ..engine.adapters.mha import adapt_attention

__all__ = ["FORMAT_VERSION", "ROLES", "SpecError", "PassThrough", "structure_spec", "apply_spec",
           "validate_spec", "layer_role", "check_attr", "Bounds"]

FORMAT_VERSION = 1
ROLES = ("linear", "conv", "norm", "embedding", "attention", "other")
SPARSE_THRESHOLD = 0.01  # tensors with more than 1% zeros are listed in sparsity.layers
_TOP_KEYS = ("format_version", "base", "layers", "removed_blocks", "merged_blocks", "sparsity", "method",
             "stats", "versions")
_BASE_KEYS = ("library", "architecture", "config", "source")
_LAYER_KEYS = ("index", "path", "type", "role", "tensors", "base_tensors", "attrs")
_BLOCK_KEYS = {"removed_blocks": ("index", "path", "type"), "merged_blocks": ("index", "path", "type", "became")}
_SPARSITY_KEYS = ("global_nonzero", "layers")
_SPARSE_LAYER_KEYS = ("index", "path", "tensor", "nonzero")
_METHOD_KEYS = ("name", "settings")
_TIMM_ARCH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?$")  # a registered name and tag: no 'hf-hub:' source
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "heads")  # = graph.tracer.HEAD_COUNT_ATTRS


class PassThrough(nn.Module):
    """Stands in for a removed block: returns its first input unchanged (extra arguments ignored)."""

    def forward(self, x, *args, **kwargs):
        return x


# --------------------------------------------------------------------------- helpers


def layer_role(module: nn.Module) -> str:
    """Coarse role of a module, recorded for readers of the spec (not used as a key)."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in name:
        return "norm"
    if isinstance(module, nn.Embedding) or "Embed" in name:
        return "embedding"
    if "Attention" in name or any(_is_int(getattr(module, a, None)) for a in _HEAD_COUNT_ATTRS):
        return "attention"
    return "other"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_shape_value(v) -> bool:
    """A number or a (nested) tuple/list of numbers: the kind of attribute a spec records."""
    if _is_number(v):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_shape_value(x) for x in v)
    return False


def _encode(v):
    return [_encode(x) for x in v] if isinstance(v, (tuple, list)) else v


def _decode(value, like):
    """JSON value -> Python value, with the container types of ``like`` (the base's attribute)."""
    if not isinstance(value, list):
        return value
    likes = list(like) if isinstance(like, (tuple, list)) and len(like) == len(value) else [None] * len(value)
    items = [_decode(v, w) for v, w in zip(value, likes)]
    if isinstance(like, torch.Size):
        return torch.Size(items)
    if isinstance(like, list):
        return items
    return tuple(items)


def _shape_attrs(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and _is_shape_value(v)}


def _own_tensors(module: nn.Module) -> dict:
    return {**module._parameters, **module._buffers}


def _modules_by_path(model: nn.Module) -> dict:
    return dict(model.named_modules())


def _type_names(module: nn.Module) -> set:
    return {c.__name__ for c in type(module).__mro__}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "timm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    from .. import __version__

    out["hf_prune"] = __version__
    return out


def _jsonable(value, what: str):
    """A JSON-compatible copy of ``value``; tuples become lists, other objects their ``repr``."""
    def default(o):
        if isinstance(o, torch.Tensor) and o.numel() == 1:
            return o.item()
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        return repr(o)

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=False))
    except ValueError as exc:
        raise SpecError(f"{what} is not JSON-serialisable: {exc}") from exc


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- computing


def _is_merged(module) -> bool:
    """A block that depth pruning (UPDP) merged into fewer linear layers."""
    return module is not None and callable(getattr(module, "describe", None)) and \
        type(module).__name__ == "MergedBlock"


def _is_removed(pruned: nn.Module | None, base: nn.Module) -> bool:
    return pruned is None or (isinstance(pruned, (nn.Identity, PassThrough))
                              and not isinstance(base, (nn.Identity, PassThrough)))


def _layer_entry(index: int, path: str, module: nn.Module, base: nn.Module) -> dict | None:
    tensors, base_tensors, attrs = {}, {}, {}
    mine, theirs = _own_tensors(module), _own_tensors(base)
    if set(mine) != set(theirs):
        raise SpecError(f"module '{path}' ({type(module).__name__}) has tensors {sorted(mine)} but the base has "
                        f"{sorted(theirs)}; format v1 records new shapes, not added or removed tensors")
    for name, t in mine.items():
        b = theirs[name]
        if (t is None) != (b is None):
            raise SpecError(f"'{path}.{name}' is None in one of the pruned and base models; format v1 cannot "
                            "record added or removed tensors")
        if t is None or tuple(t.shape) == tuple(b.shape):
            continue
        if name in module._buffers and name in module._non_persistent_buffers_set:
            raise SpecError(f"'{path}.{name}' is a non-persistent buffer whose shape changed; its values are not "
                            "saved with the weights, so the pruned model cannot be rebuilt from the checkpoint")
        tensors[name] = list(t.shape)
        base_tensors[name] = list(b.shape)
    new, old = _shape_attrs(module), _shape_attrs(base)
    for name in old:
        if name not in vars(module):
            raise SpecError(f"attribute '{path}.{name}' exists in the base but not in the pruned model")
    for name, value in new.items():
        if name not in old or old[name] != value or type(old[name]) is not type(value):
            if not _NAME.match(name):
                continue
            attrs[name] = _encode(value)
    if not tensors and not attrs:
        return None
    return {"index": index, "path": path, "type": type(base).__name__, "role": layer_role(base),
            "tensors": tensors, "base_tensors": base_tensors, "attrs": attrs}


def _sparsity(model: nn.Module, index_of: dict) -> dict:
    total = nonzero = 0
    layers = []
    for path, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is None or p.dim() < 2 or p.is_meta:
                continue
            nz = int(torch.count_nonzero(p.detach()))
            total += p.numel()
            nonzero += nz
            frac = nz / p.numel()
            if 1.0 - frac > SPARSE_THRESHOLD and path in index_of:
                layers.append({"index": index_of[path], "path": path, "tensor": name, "nonzero": round(frac, 6)})
    if not layers:
        return {}
    return {"global_nonzero": round(nonzero / total, 6), "layers": layers}


def structure_spec(model: nn.Module, base_model: nn.Module | None = None, *, method: str | None = None,
                   settings: dict | None = None, stats: dict | None = None, model_args: dict | None = None) -> dict:
    """The structure spec (format v1) of ``model`` relative to ``base_model``.

    ``base_model`` is a freshly built model of the same configuration (any device, ``meta`` is
    fine); by default it is rebuilt from ``model``'s config (transformers) or from the arguments
    timm recorded at ``create_model`` (pass ``model_args`` to override them). ``stats`` entries
    (``params_before``, ``macs_before``, ``macs_after``, ...) are merged over the parameter counts
    computed here (``params_after`` always; ``params_before`` for timm models, whose base is the
    dense model; a transformers config may already follow the pruned widths, so pass it).
    Raises :class:`SpecError` if the difference cannot be expressed in format v1 or if applying
    the spec to a fresh base does not reproduce ``model``'s parameter names and shapes.
    """
    from ..engine.masks import get_mask
    from .base import base_model_of, build_base, describe_base

    if get_mask(model) is not None:
        raise SpecError("the model still carries pruning masks (prune(..., compact=False)); call "
                        "hf_prune.compact(model) before saving it")
    base_desc = describe_base(model, model_args)
    if base_model is None:
        base_model = base_model_of(model, model_args)
    pruned_modules = _modules_by_path(model)
    layers, removed = [], []
    base_list = list(base_model.named_modules())
    index_of = {path: i for i, (path, _) in enumerate(base_list)}
    removed_prefixes: list[str] = []
    merged: list[dict] = []
    for index, (path, base_mod) in enumerate(base_list):
        if any(path.startswith(p + ".") for p in removed_prefixes):
            continue
        mod = pruned_modules.get(path)
        if _is_merged(mod):
            merged.append({"index": index, "path": path, "type": type(base_mod).__name__, "became": mod.describe()})
            removed_prefixes.append(path)
            continue
        if _is_removed(mod, base_mod):
            if path == "":
                raise SpecError("the whole model was replaced; nothing to save")
            removed.append({"index": index, "path": path, "type": type(base_mod).__name__})
            removed_prefixes.append(path)
            continue
        if type(mod) is not type(base_mod) and type(base_mod) not in type(mod).__mro__:
            raise SpecError(f"module '{path}' is a {type(mod).__name__} but the base has a {type(base_mod).__name__}; "
                            "format v1 cannot record replaced (merged) modules")
        entry = _layer_entry(index, path, mod, base_mod)
        if entry is not None:
            layers.append(entry)
    extra = [p for p in pruned_modules if p not in index_of and not any(p == r or p.startswith(r + ".")
                                                                        for r in removed_prefixes)]
    if extra:
        raise SpecError(f"the pruned model has modules the base does not have: {extra[:5]}; format v1 cannot "
                        "record added modules")
    # A model loaded from (or saved to) a checkpoint carries its spec in config.hf_prune; when the
    # structure is unchanged, keep what only the original pruning run knew (method, MACs).
    previous = _previous_spec(model)
    if previous and (previous.get("layers"), previous.get("removed_blocks"),
                     previous.get("merged_blocks")) != (layers, removed, merged):
        previous = None
    if method is None and previous:
        method, settings = previous["method"].get("name"), settings or previous["method"].get("settings")
    all_stats = {"params_after": _count_params(model)}
    if base_desc["library"] == "timm":
        # timm's model_args are never edited by pruning, so the base is the dense model. A transformers
        # config follows uniform widths after compaction: its base may already be smaller than the
        # dense model, so the dense numbers must come from the caller (stats=).
        all_stats["params_before"] = _count_params(base_model)
    if previous:
        all_stats.update({k: v for k, v in previous.get("stats", {}).items() if k not in all_stats})
    all_stats.update(stats or {})
    spec = {
        "format_version": FORMAT_VERSION,
        "base": base_desc,
        "layers": layers,
        "removed_blocks": removed,
        "merged_blocks": merged,
        "sparsity": _sparsity(model, index_of),
        "method": {"name": method, "settings": _jsonable(settings or {}, "method settings")},
        "stats": _jsonable(all_stats, "stats"),
        "versions": _versions(),
    }
    validate_spec(spec)
    # The spec must rebuild the model: apply it to a second fresh base and compare names and shapes.
    check = build_base(base_desc, config=getattr(model, "config", None)
                       if base_desc["library"] == "transformers" else None)
    apply_spec(check, spec)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in check.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise SpecError(f"the spec does not reproduce the pruned model (differences: {diff}); the model was "
                        "changed in a way format v1 cannot record")
    return spec


def _previous_spec(model: nn.Module) -> dict | None:
    spec = getattr(getattr(model, "config", None), "hf_prune", None)
    return spec if isinstance(spec, dict) and isinstance(spec.get("method"), dict) else None


# --------------------------------------------------------------------------- validating


def _fail(msg: str):
    raise SpecError(f"invalid hf_prune structure spec: {msg}")


def _no_unknown_keys(obj: dict, known, where: str) -> None:
    unknown = sorted(set(obj) - set(known), key=str)
    if unknown:
        _fail(f"{where} has unknown keys {unknown} (known: {list(known)}); this hf_prune does not know what they "
              "mean, so it refuses them rather than ignore them")


def _check_shape(shape, where: str):
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(f"{where} must be a list of non-negative integers, got {shape!r}")


def _check_ref(entry, where: str):
    if not isinstance(entry, dict):
        _fail(f"{where} must be an object, got {type(entry).__name__}")
    if not _is_int(entry.get("index")) or entry["index"] < 0:
        _fail(f"{where}.index must be a non-negative integer, got {entry.get('index')!r}")
    if not isinstance(entry.get("path"), str):
        _fail(f"{where}.path must be a string, got {entry.get('path')!r}")
    if not isinstance(entry.get("type"), str) or not entry["type"]:
        _fail(f"{where}.type must be a class name, got {entry.get('type')!r}")


def validate_spec(spec) -> dict:
    """Check a spec's structure without touching any model; return it or raise :class:`SpecError`."""
    if not isinstance(spec, dict):
        _fail(f"expected a JSON object, got {type(spec).__name__}")
    version = spec.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise SpecError(f"unsupported hf_prune format_version {version!r}: this hf_prune reads version "
                        f"{FORMAT_VERSION}. Upgrade hf_prune (pip install -U hf_prune) to load this checkpoint.")
    missing = [k for k in _TOP_KEYS if k not in spec]
    if missing:
        _fail(f"missing fields {missing}")
    _no_unknown_keys(spec, _TOP_KEYS, "the top level")
    base = spec["base"]
    if not isinstance(base, dict) or base.get("library") not in ("transformers", "timm"):
        got = base.get("library") if isinstance(base, dict) else base
        _fail(f"base.library must be 'transformers' or 'timm', got {got!r}")
    _no_unknown_keys(base, _BASE_KEYS, "base")
    if not isinstance(base.get("architecture"), str) or not base["architecture"]:
        _fail(f"base.architecture must be a non-empty string, got {base.get('architecture')!r}")
    if not isinstance(base.get("config"), dict):
        _fail("base.config must be an object")
    if base.get("source") is not None and not isinstance(base["source"], str):
        _fail(f"base.source must be a Hub repo id or null, got {base['source']!r}")
    if base["library"] == "timm" and not isinstance(base["config"].get("model_args", {}), dict):
        _fail("base.config.model_args must be an object")
    if base["library"] == "transformers" and not _NAME.match(base["architecture"]):
        _fail(f"base.architecture {base['architecture']!r} is not a class name")
    if base["library"] == "timm" and not _TIMM_ARCH.match(base["architecture"]):
        _fail(f"base.architecture {base['architecture']!r} is not a timm model name (sources such as 'hf-hub:' "
              "are refused: the base is built from its name alone)")

    for key in ("layers", "removed_blocks", "merged_blocks"):
        if not isinstance(spec[key], list):
            _fail(f"{key} must be a list")
    for i, entry in enumerate(spec["merged_blocks"]):
        _check_ref(entry, f"merged_blocks[{i}]")
        if not isinstance(entry.get("became"), dict) or entry["became"].get("type") != "UPDPMergedBlock":
            _fail(f"merged_blocks[{i}] must describe the merged block under 'became'")
    seen_index, seen_path = {}, {}
    for i, entry in enumerate(spec["layers"]):
        where = f"layers[{i}]"
        _check_ref(entry, where)
        _no_unknown_keys(entry, _LAYER_KEYS, where)
        if entry.get("role") not in ROLES:
            _fail(f"{where}.role must be one of {ROLES}, got {entry.get('role')!r}")
        for field in ("tensors", "attrs"):
            if not isinstance(entry.get(field), dict):
                _fail(f"{where}.{field} must be an object")
        if not entry["tensors"] and not entry["attrs"]:
            _fail(f"{where} ('{entry['path']}') changes nothing")
        base_tensors = entry.get("base_tensors", {})
        if not isinstance(base_tensors, dict) or set(base_tensors) - set(entry["tensors"]):
            _fail(f"{where}.base_tensors must be an object with a subset of the names in tensors")
        for name, shape in list(entry["tensors"].items()) + [(f"base:{k}", v) for k, v in base_tensors.items()]:
            if not _NAME.match(name.removeprefix("base:")):
                _fail(f"{where}.tensors has an invalid name {name!r}")
            _check_shape(shape, f"{where}.tensors[{name!r}]")
        for name, value in entry["attrs"].items():
            if not _NAME.match(name):
                _fail(f"{where}.attrs has an invalid attribute name {name!r}")
            if not _is_shape_value(value):
                _fail(f"{where}.attrs[{name!r}] must be a number or a list of numbers, got {value!r}")
        for key, table in (("index", seen_index), ("path", seen_path)):
            if entry[key] in table:
                _fail(f"{where} and layers[{table[entry[key]]}] both have {key} {entry[key]!r}")
            table[entry[key]] = i
    removed_paths = []
    for key in ("removed_blocks", "merged_blocks"):
        for i, entry in enumerate(spec[key]):
            _check_ref(entry, f"{key}[{i}]")
            _no_unknown_keys(entry, _BLOCK_KEYS[key], f"{key}[{i}]")
            if entry["path"] == "":
                _fail(f"{key}[{i}] replaces the whole model")
            removed_paths.append(entry["path"])
    for i, entry in enumerate(spec["layers"]):
        for r in removed_paths:
            if entry["path"] == r or entry["path"].startswith(r + "."):
                _fail(f"layers[{i}] ('{entry['path']}') lies inside removed block '{r}'")

    sparsity = spec["sparsity"]
    if not isinstance(sparsity, dict):
        _fail("sparsity must be an object")
    _no_unknown_keys(sparsity, _SPARSITY_KEYS, "sparsity")
    if sparsity:
        g = sparsity.get("global_nonzero")
        if not _is_number(g) or not 0 <= g <= 1:
            _fail(f"sparsity.global_nonzero must be a fraction, got {g!r}")
        if not isinstance(sparsity.get("layers"), list):
            _fail("sparsity.layers must be a list")
        for i, entry in enumerate(sparsity["layers"]):
            if not isinstance(entry, dict) or not _is_number(entry.get("nonzero")) or not 0 <= entry["nonzero"] <= 1:
                _fail(f"sparsity.layers[{i}] must have a nonzero fraction")
            _no_unknown_keys(entry, _SPARSE_LAYER_KEYS, f"sparsity.layers[{i}]")
    method = spec["method"]
    if not isinstance(method, dict) or not (method.get("name") is None or isinstance(method.get("name"), str)) \
            or not isinstance(method.get("settings", {}), dict):
        _fail("method must be an object {name: string or null, settings: object}")
    _no_unknown_keys(method, _METHOD_KEYS, "method")
    stats = spec["stats"]
    speed = stats.get("speed") if isinstance(stats, dict) else None
    if not isinstance(stats, dict) or not all(v is None or _is_number(v) for k, v in stats.items() if k != "speed"):
        _fail("stats must map names to numbers (and 'speed' to the measured speed)")
    if speed is not None and (not isinstance(speed, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str) or _is_number(v)) for k, v in speed.items())):
        _fail("stats.speed must map names to numbers or strings (as measure_speedup reports them)")
    if not isinstance(spec["versions"], dict) or not all(v is None or isinstance(v, str)
                                                          for v in spec["versions"].values()):
        _fail("versions must map package names to version strings")
    return spec


# --------------------------------------------------------------------------- what a spec may change

# Attributes compaction sets on standard layers (hf_prune.engine.surgery._fix_module); nothing else on them.
_LAYER_ATTRS = (
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.Embedding, ("embedding_dim",)),
)
_AT_LEAST_ONE = ("groups", "num_groups")
_HEAD_WIDTH_ATTRS = ("all_head_size", "attn_dim", "inner_dim", "all_head_dim")  # = engine.surgery.HEAD_WIDTH_ATTRS
_HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size", "dim_head", "attn_head_size")
_SCALE_ATTRS = ("scaling", "scale")


class Bounds:
    """The largest sizes a spec may give the modules of a freshly built base (see the module docstring)."""

    def __init__(self, model: nn.Module, library: str):
        self.exact = library == "timm"  # timm's model_args are never edited by pruning: the base is the dense model
        tensors = [t for m in model.modules() for t in _own_tensors(m).values() if t is not None]
        self.widest = max((d for t in tensors for d in t.shape), default=0)
        self.largest = max((t.numel() for t in tensors), default=0)

    def size(self, base: int) -> int:
        return base if self.exact else max(base, self.widest)

    def numel(self, base: int) -> int:
        return base if self.exact else max(base, self.largest)


def _check_tensor(where: str, name: str, shape: list, base: torch.Tensor, bounds: Bounds) -> None:
    base_shape = list(base.shape)
    if len(shape) != len(base_shape):
        raise SpecError(f"{where}: tensor '{name}' has {len(shape)} dimensions in the spec but {len(base_shape)} in "
                        "the base; pruning never changes that")
    if any(d > bounds.size(b) for d, b in zip(shape, base_shape)) or math.prod(shape) > bounds.numel(base.numel()):
        raise SpecError(f"{where}: tensor '{name}' of shape {shape} is larger than the base's {base_shape}; pruning "
                        "only removes, so the checkpoint is corrupted or was edited")


def _allowed_attrs(module: nn.Module) -> tuple | None:
    """The attributes a spec may set on ``module``'s type; None: the generic rules for other modules."""
    for cls, names in _LAYER_ATTRS:
        if isinstance(module, cls):
            return names
    return None


def check_attr(module: nn.Module, name: str, value, attrs: dict, bounds: Bounds, where: str) -> None:
    """Raise :class:`SpecError` unless compaction could have set ``module.name = value`` (see module docstring).

    ``module`` is the freshly built base module; ``attrs`` all the attributes its entry sets.
    """
    def refuse(why: str):
        raise SpecError(f"{where}: attrs[{name!r}] = {value!r} on a {type(module).__name__}: {why}; the checkpoint "
                        "is corrupted or was edited")

    base = vars(module).get(name)
    if name not in vars(module) or callable(base) or isinstance(base, (torch.Tensor, nn.Module)):
        refuse("the base module has no such plain attribute, and pruning adds none")
    allowed = _allowed_attrs(module)
    if allowed is not None and name not in allowed:
        refuse(f"pruning sets only {list(allowed)} on this layer type")
    if allowed is not None or name in _HEAD_COUNT_ATTRS + _HEAD_WIDTH_ATTRS + _HEAD_SIZE_ATTRS:
        if not _is_int(base):
            refuse(f"the base value {base!r} is not an integer")
        low = 1 if name in _AT_LEAST_ONE else 0
        if not _is_int(value) or not low <= value <= bounds.size(base):
            refuse(f"must be an integer in [{low}, {bounds.size(base)}] (the base has {base})")
        return
    if name in _SCALE_ATTRS:
        _check_scale(module, name, value, attrs, refuse)
        return
    if not isinstance(base, (tuple, list)) or not all(_is_int(b) for b in base):
        refuse("only widths, head counts and sizes, scales and per-channel shapes may change")
    if not isinstance(value, list) or len(value) != len(base) or not all(_is_int(v) and v >= 0 for v in value):
        refuse(f"must be a list of {len(base)} non-negative integers like the base's {list(base)}")
    if name == "normalized_shape":
        changing = range(len(base))
    else:  # a per-channel broadcast shape such as (C, 1, 1): only the channel entry may change
        changing = [i for i, b in enumerate(base) if b != 1]
        if len(changing) != 1:
            refuse(f"the base value {list(base)} is not a per-channel shape (one entry, the rest 1)")
    for i, (v, b) in enumerate(zip(value, base)):
        if (i in changing and v > bounds.size(b)) or (i not in changing and v != b):
            refuse(f"entry {i} may not become {v} (base {list(base)})")


def _check_scale(module: nn.Module, name: str, value, attrs: dict, refuse) -> None:
    base = vars(module)[name]
    if not isinstance(base, float) or not _is_number(value) or value <= 0:
        refuse(f"must be a positive finite number replacing the base's float (got base {base!r})")
    size_attr = next((a for a in _HEAD_SIZE_ATTRS if _is_int(vars(module).get(a)) and vars(module)[a] > 0), None)
    if size_attr is None or not math.isclose(base, vars(module)[size_attr] ** -0.5, rel_tol=1e-6):
        return  # the base does not derive its scale from the head size: nothing to tie it to
    size = attrs.get(size_attr, vars(module)[size_attr])
    if not _is_int(size) or size <= 0 or not math.isclose(value, size ** -0.5, rel_tol=1e-6):
        refuse(f"the base uses {size_attr} ** -0.5, so it must be {size!r} ** -0.5")


def _check_merged(entry: dict, block: nn.Module, bounds: Bounds, where: str) -> None:
    """A merged block's description, bounded by the block it replaces, before anything is built from it."""
    tensors = [t for t in list(block.parameters()) + list(block.buffers())]
    widest = bounds.size(max((d for t in tensors for d in t.shape), default=0))
    total = bounds.numel(sum(t.numel() for t in tensors))
    kernel = max([max(m.kernel_size) for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)] or [1])
    d = entry["became"]
    body, sc = d.get("body"), d.get("shortcut")
    if not isinstance(body, list) or not body or not all(isinstance(x, dict) for x in body):
        raise SpecError(f"{where}.became.body must be a non-empty list of layer descriptions")
    layers = body + ([sc] if isinstance(sc, dict) else [])
    if sc not in (None, "identity") and not isinstance(sc, dict):
        raise SpecError(f"{where}.became.shortcut must be null, 'identity' or a layer description, got {sc!r}")
    size = 0
    for i, layer in enumerate(layers):
        at = f"{where}.became layer {i}"
        if layer.get("op") not in ("linear", "conv2d"):
            raise SpecError(f"{at}: op must be 'linear' or 'conv2d', got {layer.get('op')!r}")
        c_in, c_out, groups = layer.get("in"), layer.get("out"), layer.get("groups", 1)
        if not all(_is_int(c) and 1 <= c <= widest for c in (c_in, c_out)):
            raise SpecError(f"{at}: in/out ({c_in!r}, {c_out!r}) must be integers in [1, {widest}], the widest "
                            "dimension of the block it replaces")
        if not _is_int(groups) or groups < 1 or c_in % groups or c_out % groups:
            raise SpecError(f"{at}: groups={groups!r} must be a positive integer dividing in and out")
        k = [1]
        if layer["op"] == "conv2d":
            k = layer.get("kernel")
            pairs = {"kernel": k, "stride": layer.get("stride"), "dilation": layer.get("dilation")}
            for key, v in pairs.items():
                if not isinstance(v, list) or len(v) != 2 or not all(_is_int(x) and x >= 1 for x in v):
                    raise SpecError(f"{at}: {key} must be two positive integers, got {v!r}")
            if max(k) > kernel:
                raise SpecError(f"{at}: kernel {k} is larger than any kernel of the block it replaces ({kernel})")
            pad = layer.get("padding")
            if pad != "tf_same" and not (isinstance(pad, list) and len(pad) == 2
                                         and all(_is_int(x) and 0 <= x <= kernel for x in pad)):
                raise SpecError(f"{at}: padding must be 'tf_same' or two integers in [0, {kernel}], got {pad!r}")
        if not isinstance(layer.get("bias"), bool):
            raise SpecError(f"{at}: bias must be true or false")
        size += c_in * c_out // groups * math.prod(k) + c_out
    if size > total:
        raise SpecError(f"{where}: the merged block would hold {size} numbers, more than the {total} of the block it "
                        "replaces; the checkpoint is corrupted or was edited")


# --------------------------------------------------------------------------- applying


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Resize a freshly built base ``model`` in place so that it has the pruned structure.

    Every entry is checked against the model (index, path, type, base shapes, sizes within the
    bounds and attributes on the allow-list of the module docstring) before anything is changed or
    allocated; a mismatch raises :class:`SpecError` naming the entry and leaves the model untouched.
    A failure while changing it (an interrupt too) undoes every change. New tensors are
    uninitialised (load the weights afterwards).
    """
    validate_spec(spec)
    modules = list(model.named_modules())

    def lookup(entry, where):
        i = entry["index"]
        if i >= len(modules):
            raise SpecError(f"{where} ('{entry['path']}'): index {i} is out of range, the model has only "
                            f"{len(modules)} modules; the checkpoint was made from another configuration")
        path, module = modules[i]
        if path != entry["path"] or entry["type"] not in _type_names(module):
            raise SpecError(f"{where}: expected a {entry['type']} at '{entry['path']}' (module #{i}) but found a "
                            f"{type(module).__name__} at '{path}'; the checkpoint was made from another "
                            "configuration or library version")
        return module

    bounds = Bounds(model, spec["base"]["library"])
    plan = []
    for n, entry in enumerate(spec["layers"]):
        where = f"layers[{n}]"
        module = lookup(entry, where)
        own = _own_tensors(module)
        for name, shape in entry["tensors"].items():
            if own.get(name) is None:
                raise SpecError(f"{where} ('{entry['path']}'): {type(module).__name__} has no tensor '{name}'")
            want = entry.get("base_tensors", {}).get(name)
            if want is not None and list(own[name].shape) != want:
                raise SpecError(f"{where} ('{entry['path']}.{name}'): the base has shape {list(own[name].shape)}, the "
                                f"spec was made from a base with shape {want}; the configuration differs")
            _check_tensor(f"{where} ('{entry['path']}')", name, shape, own[name], bounds)
        for name, value in entry["attrs"].items():
            if name in module._parameters or name in module._buffers or name in module._modules:
                raise SpecError(f"{where} ('{entry['path']}'): attribute '{name}' names a tensor or submodule")
            check_attr(module, name, value, entry["attrs"], bounds, f"{where} ('{entry['path']}')")
        plan.append((entry, module))
    removals = [(entry, lookup(entry, f"removed_blocks[{n}]")) for n, entry in enumerate(spec["removed_blocks"])]
    merges = [(entry, lookup(entry, f"merged_blocks[{n}]")) for n, entry in enumerate(spec["merged_blocks"])]
    for n, (entry, block) in enumerate(merges):
        _check_merged(entry, block, bounds, f"merged_blocks[{n}] ('{entry['path']}')")
    if merges:
        from ..methods.updp.merge import MergedBlock

        built = [MergedBlock.from_description(entry["became"]) for entry, _ in merges]

    _apply_checked(model, plan, removals, merges, built if merges else [])
    return model


def _apply_checked(model: nn.Module, plan: list, removals: list, merges: list, built: list) -> None:
    """Change the model as checked; on any failure (an interrupt too) every change is undone."""
    changes = []  # (undo function) in the order made
    try:
        _apply_plan(model, plan, removals, merges, built, changes)
    except BaseException:
        for undo in reversed(changes):
            undo()
        raise


def _apply_plan(model, plan, removals, merges, built, changes) -> None:
    def set_tensor(module, kind, name, new):
        table = getattr(module, kind)
        old = table[name]
        changes.append(lambda: table.__setitem__(name, old))
        table[name] = new

    def set_attr(obj, name, value):
        had, old = name in vars(obj) or name == "__class__", getattr(obj, name, None)
        changes.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))
        setattr(obj, name, value)

    for entry, module in plan:
        for name, shape in entry["tensors"].items():
            old = _own_tensors(module)[name]
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if name in module._parameters:
                set_tensor(module, "_parameters", name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                set_tensor(module, "_buffers", name, new)
        for name, value in entry["attrs"].items():
            set_attr(module, name, _decode(value, getattr(module, name, None)))
        adapt_attention(module, set_attr)
    by_path = dict(model.named_modules())
    for entry, _ in removals:
        parent_path, _, child = entry["path"].rpartition(".")
        set_tensor(by_path[parent_path], "_modules", child, PassThrough())
    for (entry, old), new in zip(merges, built):
        parent_path, _, child = entry["path"].rpartition(".")
        param = next(old.parameters(), None)
        if param is not None:
            new = new.to(device=param.device, dtype=param.dtype)
        set_tensor(by_path[parent_path], "_modules", child, new)
