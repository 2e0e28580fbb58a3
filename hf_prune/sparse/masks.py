"""Unstructured weight masks: which individual weights of Conv/Linear layers are zero.

This module is the *mask* half of weight pruning; *how sparse each layer is* (allocation:
uniform, global, LAMP, ERK, RD) lives in :mod:`hf_prune.sparse.allocation` and
:mod:`hf_prune.methods.rd.curves`, and *which weights inside a layer* (selection: magnitude here, OBS in
:mod:`hf_prune.methods.ovit.obs`) takes a layer and a sparsity. The three combine freely.

* :func:`prunable_layers` — every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` of a model except, by
  default, the classifier and the stem / patch embedding (``exclude_stem``, ``exclude_classifier``,
  ``include``, ``exclude`` change that).
* :class:`WeightMasks` — boolean keep-masks (``True`` = weight kept) per layer. :meth:`enforce`
  multiplies the weights in place (call it after every optimizer step; the pruning callbacks do),
  :meth:`stats` gives ``{"global_sparsity", "layers": {name: sparsity}, ...}``,
  :meth:`state_dict` / :meth:`from_state_dict` a JSON-serialisable form (per layer either a
  run-length list or a base64 bitmap, whichever is shorter) and :meth:`save_file` /
  :meth:`load_file` safetensors bool tensors. No pickle anywhere. Masks only grow:
  :meth:`set` intersects with the existing mask unless ``grow_only=False``.
* Selection: :func:`select_magnitude` (exactly ``round(sparsity·n)`` weights, smallest ``|w|``,
  already-masked weights first) and :func:`select_nm` (N:M along the input dimension).
* Export: :func:`to_semi_structured` (2:4 → ``torch.sparse.to_sparse_semi_structured``, CUDA only)
  and :func:`safetensors_size` (what a sparse model really costs on disk).

Caveat: a layer that transforms its weight before use (timm's ``StdConv2d`` weight
standardisation, weight norm) turns zeros into non-zeros; such layers are still listed (they are
Conv/Linear subclasses) and their *stored* weights are sparse, but the computation is not.
Exclude them with ``exclude=`` if that matters.
"""
from __future__ import annotations

import base64
import gzip
import inspect
import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import PruningError
from ..core.inputs import logits_of, to_device

__all__ = [
    "PRUNABLE_TYPES", "ATTR", "prunable_layers", "find_stem", "find_classifier", "WeightMasks",
    "get_weight_masks", "magnitude_scores", "select_magnitude", "select_nm", "is_nm", "exact_counts",
    "iter_batches", "forward_logits", "to_semi_structured", "safetensors_size", "STATE_VERSION",
]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ATTR = "hf_prune_weight_masks"  # model.__dict__ key (not a submodule, not in the state dict)
STATE_VERSION = 1
_STEM_WORDS = ("patch_embed", "patch_embedding", "patch_embeddings", "stem")
_HEAD_ATTRS = ("classifier", "head", "fc", "heads", "head_dist")


# ----------------------------------------------------------------------------------------- layers


def _named_prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2}


def _module_names(model: nn.Module, modules: Iterable) -> set[str]:
    ids = {id(m) for m in modules if isinstance(m, nn.Module)}
    return {n for n, m in model.named_modules() if id(m) in ids}


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


def find_classifier(model: nn.Module) -> list[str]:
    """Names of the Conv/Linear modules that form the classification head.

    timm's ``get_classifier()`` (also through ``TimmWrapperForImageClassification.timm_model``),
    then the usual attributes (``classifier``, ``head``, ``fc``, ``head_dist``) of the model or of
    its ``timm_model``; if none exists, the last prunable module in registration order.
    """
    prunable = _named_prunable(model)
    roots = [model] + [getattr(model, a) for a in ("timm_model",) if isinstance(getattr(model, a, None), nn.Module)]
    heads: list = []
    for r in roots:
        get = getattr(r, "get_classifier", None)
        if callable(get):
            try:
                h = get()
            except Exception:  # noqa: BLE001 - a model whose get_classifier needs arguments
                h = None
            heads.extend(h if isinstance(h, (tuple, list)) else [h])
        for a in _HEAD_ATTRS:
            h = getattr(r, a, None)
            if isinstance(h, nn.Module):
                heads.append(h)
    prefixes = _module_names(model, heads)
    names = [n for n in prunable if _under(n, prefixes)] if prefixes else []
    if not names and prunable:
        names = [list(prunable)[-1]]
    return names


def find_stem(model: nn.Module, example_inputs=None) -> list[str]:
    """Names of the Conv/Linear modules that read the model's input (stem / patch embedding).

    With ``example_inputs`` a forward pass finds every prunable module whose input *is* an input
    tensor; without, the first prunable module in registration order and any whose name contains
    ``patch_embed`` / ``patch_embeddings`` / ``stem`` (only its first Conv/Linear).
    """
    prunable = _named_prunable(model)
    if example_inputs is not None:
        inputs = example_inputs.values() if isinstance(example_inputs, Mapping) else (
            example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs])
        ids = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
        found: list[str] = []
        handles = []

        def hook(name):
            def fn(module, args):
                if args and isinstance(args[0], torch.Tensor) and (
                        id(args[0]) in ids or id(getattr(args[0], "_base", None)) in ids):
                    found.append(name)
            return fn

        for n, m in prunable.items():
            handles.append(m.register_forward_pre_hook(hook(n)))
        try:
            with torch.no_grad():
                forward_logits(model, example_inputs)
        finally:
            for h in handles:
                h.remove()
        if found:
            return sorted(set(found), key=list(prunable).index)
    names = list(prunable)
    out = names[:1]
    for word in _STEM_WORDS:
        for n in names:
            if word in n.split(".")[-2:] or any(part.startswith(word) for part in n.split(".")):
                if n not in out:
                    out.append(n)
                break
    return out


def prunable_layers(model: nn.Module, *, exclude_stem: bool = True, exclude_classifier: bool = True,
                    include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                    example_inputs=None) -> dict[str, nn.Module]:
    """``{module name: module}`` of the Conv/Linear layers whose weights may be pruned.

    ``include``: only modules at or under these names (default: all). ``exclude``: never these
    (names or prefixes). The stem/patch embedding (:func:`find_stem`; ``example_inputs`` makes the
    detection exact) and the classifier (:func:`find_classifier`) are left out unless
    ``exclude_stem`` / ``exclude_classifier`` is False.
    """
    layers = _named_prunable(model)
    if include is not None:
        include = list(include)
        layers = {n: m for n, m in layers.items() if _under(n, include)}
    exclude = [e for e in exclude if e]
    if exclude:
        layers = {n: m for n, m in layers.items() if not _under(n, exclude)}
    drop: set[str] = set()
    if exclude_stem:
        drop.update(find_stem(model, example_inputs))
    if exclude_classifier:
        drop.update(find_classifier(model))
    layers = {n: m for n, m in layers.items() if n not in drop}
    if not layers:
        raise PruningError("no prunable Conv/Linear weights left in the model after excluding the stem, the "
                           "classifier and exclude=; pass exclude_stem=False / exclude_classifier=False or "
                           "include=[...]")
    return layers


# ----------------------------------------------------------------------------------------- masks


def _rle(flat: torch.Tensor) -> list[int]:
    """Run lengths of a flat bool tensor, starting with a run of True (possibly 0)."""
    n = flat.numel()
    if n == 0:
        return []
    change = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), change, torch.tensor([n])])
    runs = (bounds[1:] - bounds[:-1]).tolist()
    return runs if bool(flat[0]) else [0] + runs


def _unrle(runs: list[int], n: int) -> torch.Tensor:
    vals = torch.tensor([i % 2 == 0 for i in range(len(runs))], dtype=torch.bool)
    out = torch.repeat_interleave(vals, torch.tensor(runs, dtype=torch.long)) if runs else torch.zeros(0, dtype=torch.bool)
    if out.numel() != n:
        raise PruningError(f"run lengths sum to {out.numel()}, expected {n} weights")
    return out


def _bits(flat: torch.Tensor) -> str:
    import numpy as np

    return base64.b64encode(np.packbits(flat.cpu().numpy().astype(np.uint8)).tobytes()).decode("ascii")


def _unbits(data: str, n: int) -> torch.Tensor:
    import numpy as np

    raw = np.frombuffer(base64.b64decode(data.encode("ascii")), dtype=np.uint8)
    bits = np.unpackbits(raw)
    if bits.size < n or bits.size - n >= 8:
        raise PruningError(f"bitmap holds {bits.size} bits, expected {n} weights")
    return torch.from_numpy(bits[:n].astype(bool))


class WeightMasks:
    """Boolean keep-masks (``True`` = kept) on the ``weight`` of Conv/Linear modules.

    Build with :meth:`for_model` (all-True masks on :func:`prunable_layers`), then :meth:`set`
    masks and :meth:`enforce`. :meth:`attach` stores the object on the model
    (``model.__dict__["hf_prune_weight_masks"]``, not a submodule, so state dicts are untouched);
    :func:`get_weight_masks` finds it again.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | Mapping[str, nn.Module]):
        mods = dict(model.named_modules())
        names = list(layers)
        missing = [n for n in names if n not in mods]
        if missing:
            raise PruningError(f"modules {missing[:5]} are not in the model")
        bad = [n for n in names if not isinstance(getattr(mods[n], "weight", None), torch.Tensor)]
        if bad:
            raise PruningError(f"modules {bad[:5]} have no weight tensor to mask")
        self.modules: dict[str, nn.Module] = {n: mods[n] for n in names}
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.modules.items()}

    @classmethod
    def for_model(cls, model: nn.Module, layers: Iterable[str] | None = None, **discovery) -> "WeightMasks":
        """All-True masks on ``layers`` (default: :func:`prunable_layers` with ``discovery`` options)."""
        return cls(model, layers if layers is not None else prunable_layers(model, **discovery))

    # ------------------------------------------------------------------ access
    @property
    def layers(self) -> list[str]:
        return list(self.modules)

    def weight(self, name: str) -> torch.Tensor:
        return self.modules[name].weight

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def set(self, name: str, keep: torch.Tensor, *, grow_only: bool = True) -> None:
        """Set the keep-mask of ``name`` (intersected with the current one when ``grow_only``)."""
        if name not in self.masks:
            raise PruningError(f"{name!r} is not a masked layer")
        cur = self.masks[name]
        keep = keep.to(device=cur.device, dtype=torch.bool).reshape(cur.shape)
        self.masks[name] = (cur & keep) if grow_only else keep.clone()

    def update(self, masks: Mapping[str, torch.Tensor], *, grow_only: bool = True) -> None:
        for n, k in masks.items():
            self.set(n, k, grow_only=grow_only)

    # ------------------------------------------------------------------ enforcement
    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the masked weights in place (call after every optimizer step)."""
        for n, m in self.modules.items():
            mask = self.masks[n]
            if mask.device != m.weight.device:
                mask = self.masks[n] = mask.to(m.weight.device)
            m.weight.mul_(mask.to(m.weight.dtype))

    apply = enforce

    def attach(self, model: nn.Module) -> "WeightMasks":
        model.__dict__[ATTR] = self
        return self

    @staticmethod
    def detach(model: nn.Module) -> None:
        model.__dict__.pop(ATTR, None)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """``{"global_sparsity", "layers": {name: sparsity}, "num_weights", "num_pruned"}`` (JSON-able).

        Sparsity = fraction of masked (pruned) weights, over the masked layers only.
        """
        layers, total, pruned = {}, 0, 0
        for n, mask in self.masks.items():
            k = int(mask.numel() - int(mask.sum()))
            layers[n] = k / max(mask.numel(), 1)
            total += mask.numel()
            pruned += k
        return {"global_sparsity": pruned / max(total, 1), "layers": layers, "num_weights": int(total),
                "num_pruned": int(pruned)}

    def spec_stats(self) -> dict:
        """Flat ``{name: number}`` summary for the Hub spec's ``stats`` field."""
        s = self.stats()
        return {"weight_sparsity": s["global_sparsity"], "weights_pruned": s["num_pruned"],
                "weights_prunable": s["num_weights"]}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, encoding: str = "auto") -> dict:
        """JSON-serialisable masks: per layer its shape and the keep-mask as ``rle`` (run lengths,
        starting with a run of kept weights, in row-major order) or ``bits`` (base64 of numpy
        ``packbits``, big-endian bit order). ``encoding="auto"`` picks the shorter per layer.
        """
        if encoding not in ("auto", "rle", "bits"):
            raise ValueError(f"encoding={encoding!r} must be 'auto', 'rle' or 'bits'")
        layers = {}
        for n, mask in self.masks.items():
            flat = mask.reshape(-1).cpu()
            entry: dict = {"shape": list(mask.shape)}
            runs = _rle(flat) if encoding in ("auto", "rle") else None
            if encoding == "rle" or (encoding == "auto" and len(json.dumps(runs)) <= (flat.numel() + 7) // 8 * 4 / 3):
                entry["rle"] = runs
            else:
                entry["bits"] = _bits(flat)
            layers[n] = entry
        return {"format_version": STATE_VERSION, "kind": "weight_masks", "layers": layers}

    def load_state_dict(self, state: Mapping, *, strict: bool = True) -> None:
        """Restore masks from :meth:`state_dict` (does not :meth:`enforce`; call it after)."""
        if state.get("format_version") != STATE_VERSION or state.get("kind") != "weight_masks":
            raise PruningError(f"not a weight-mask state (format_version={state.get('format_version')!r}, "
                               f"kind={state.get('kind')!r}); expected version {STATE_VERSION}")
        layers = state["layers"]
        if strict and set(layers) != set(self.masks):
            raise PruningError(f"checkpoint masks layers {sorted(set(layers) ^ set(self.masks))[:5]} that differ "
                               "from this model's masked layers")
        for n, entry in layers.items():
            if n not in self.masks:
                continue
            cur = self.masks[n]
            if list(entry["shape"]) != list(cur.shape):
                raise PruningError(f"mask of {n!r} has shape {entry['shape']}, the weight has {list(cur.shape)}")
            flat = _unrle(entry["rle"], cur.numel()) if "rle" in entry else _unbits(entry["bits"], cur.numel())
            self.masks[n] = flat.reshape(cur.shape).to(cur.device)

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping) -> "WeightMasks":
        wm = cls(model, list(state["layers"]))
        wm.load_state_dict(state)
        return wm

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool tensor}`` (CPU, contiguous), e.g. for safetensors."""
        return {n: m.detach().cpu().contiguous() for n, m in self.masks.items()}

    def save_file(self, path: str | os.PathLike) -> None:
        """Masks as safetensors bool tensors (keys = module names)."""
        from safetensors.torch import save_file

        save_file(self.to_tensors(), str(path), metadata={"kind": "weight_masks",
                                                          "format_version": str(STATE_VERSION)})

    def load_file(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if strict and set(tensors) != set(self.masks):
            raise PruningError(f"{path} masks layers {sorted(set(tensors) ^ set(self.masks))[:5]} that differ "
                               "from this model's masked layers")
        for n, t in tensors.items():
            if n in self.masks:
                if t.shape != self.masks[n].shape:
                    raise PruningError(f"mask of {n!r} in {path} has shape {list(t.shape)}, expected "
                                       f"{list(self.masks[n].shape)}")
                self.masks[n] = t.to(torch.bool).to(self.masks[n].device)


def get_weight_masks(model: nn.Module) -> WeightMasks | None:
    return model.__dict__.get(ATTR)


# ----------------------------------------------------------------------------------------- selection


def magnitude_scores(weight: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``|w|`` (float32), with already-masked weights at ``-1`` so they are always pruned first."""
    s = weight.detach().abs().float()
    if keep is not None:
        s = s.masked_fill(~keep.to(s.device).reshape(s.shape), -1.0)
    return s


def select_magnitude(weight: torch.Tensor, sparsity: float, *, keep: torch.Tensor | None = None,
                     scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity · n)`` weights of ``weight`` (smallest ``scores``,
    default ``|w|``); weights already masked in ``keep`` are pruned first (masks only grow), so at
    least as many as ``keep`` prunes are pruned."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1]")
    n = weight.numel()
    k = int(round(float(sparsity) * n))
    s = (scores if scores is not None else magnitude_scores(weight, keep)).reshape(-1)
    if keep is not None:
        s = s.masked_fill(~keep.reshape(-1).to(s.device), -math.inf)
        k = max(k, int(n - int(keep.sum())))
    out = torch.ones(n, dtype=torch.bool, device=weight.device)
    if k > 0:
        idx = torch.topk(s, k, largest=False, sorted=False).indices
        out[idx.to(out.device)] = False
    return out.reshape(weight.shape)


def _rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def select_nm(weight: torch.Tensor, n: int = 2, m: int = 4, *, keep: torch.Tensor | None = None,
              scores: torch.Tensor | None = None) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive weights along the input dimension (the
    weight reshaped to ``out × rest``, row-major, as ``to_sparse_semi_structured`` expects) keep
    the ``n`` largest ``scores`` (default ``|w|``; already-masked weights are dropped first)."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    rows = _rows(weight)
    if rows.shape[1] % m:
        raise PruningError(f"{n}:{m} sparsity needs the input dimension ({rows.shape[1]}) to be a multiple of {m}")
    s = (scores if scores is not None else magnitude_scores(weight, keep)).reshape(rows.shape[0], -1, m)
    if keep is not None:
        s = s.masked_fill(~keep.reshape(s.shape).to(s.device), -math.inf)
    top = torch.topk(s, n, dim=-1).indices
    out = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
    if keep is not None:
        out &= keep.reshape(out.shape).to(out.device)
    return out.reshape(weight.shape)


def is_nm(mask_or_weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive entries along the input dimension has at most ``n``
    non-zeros (a bool mask counts ``True``)."""
    rows = _rows(mask_or_weight)
    if rows.shape[1] % m:
        return False
    nz = (rows != 0).reshape(rows.shape[0], -1, m).sum(-1)
    return bool((nz <= n).all())


def exact_counts(sizes: list[int], wanted: list[float], total: int, *, lower: list[int] | None = None) -> list[int]:
    """Integer counts ``c_l ∈ [lower_l, sizes_l]`` close to ``wanted`` with ``Σ c_l = total`` exactly
    (floor, then largest remainder; clamped counts move their surplus to the others)."""
    lower = lower or [0] * len(sizes)
    if not sum(lower) <= total <= sum(sizes):
        raise PruningError(f"cannot place {total} pruned weights in layers holding {sum(sizes)} weights "
                           f"({sum(lower)} already pruned)")
    w = [min(max(float(x), lo), n) for x, lo, n in zip(wanted, lower, sizes)]
    c = [int(math.floor(x)) for x in w]
    rem = total - sum(c)
    order = sorted(range(len(c)), key=lambda i: (-(w[i] - c[i]), i))
    while rem != 0:
        moved = False
        for i in (order if rem > 0 else reversed(order)):
            if rem > 0 and c[i] < sizes[i]:
                c[i] += 1
                rem -= 1
                moved = True
            elif rem < 0 and c[i] > lower[i]:
                c[i] -= 1
                rem += 1
                moved = True
            if rem == 0:
                break
        if not moved:  # pragma: no cover - excluded by the range check above
            raise PruningError("could not distribute pruned-weight counts")
    return c


# ----------------------------------------------------------------------------------------- calibration


def iter_batches(calib, max_batches: int | None = None, device=None):
    """Yield ``(inputs, labels)`` from ``calib``: an iterable of dicts ``{"pixel_values", "labels"}``
    (other keys are passed to the model too) or of ``(x, y)`` tuples, or a single such batch."""
    if calib is None:
        raise PruningError("this method needs calibration data: pass calib= (an iterable of "
                           "{'pixel_values', 'labels'} dicts or (x, y) tuples)")
    if isinstance(calib, Mapping) or (isinstance(calib, tuple) and len(calib) == 2
                                       and isinstance(calib[0], torch.Tensor)):
        calib = [calib]
    count = 0
    for batch in calib:
        if max_batches is not None and count >= max_batches:
            break
        if isinstance(batch, Mapping) or hasattr(batch, "keys"):
            batch = dict(batch)
            labels = batch.pop("labels", batch.pop("label", None))
            inputs = batch
        elif isinstance(batch, (tuple, list)):
            inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        elif isinstance(batch, torch.Tensor):
            inputs, labels = batch, None
        else:
            raise PruningError(f"calibration batches must be dicts or (x, y) tuples, got {type(batch).__name__}")
        if device is not None:
            inputs, labels = to_device(inputs, device), to_device(labels, device)
        count += 1
        yield inputs, labels


def _accepts(model: nn.Module, key: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def forward_logits(model: nn.Module, inputs) -> torch.Tensor:
    """Run ``model`` on a tensor, a dict of keyword inputs or a tuple, and return the logits."""
    if isinstance(inputs, Mapping):
        if all(_accepts(model, k) for k in inputs):
            out = model(**inputs)
        elif "pixel_values" in inputs:
            out = model(inputs["pixel_values"])
        else:
            out = model(*inputs.values())
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return logits_of(out)


# ----------------------------------------------------------------------------------------- export


def to_semi_structured(model: nn.Module, layers: Iterable[str] | None = None, *, dtype=torch.float16) -> list[str]:
    """Opt-in: replace 2:4-sparse ``nn.Linear`` weights by ``torch.sparse.to_sparse_semi_structured``
    tensors (cuSPARSELt / CUTLASS kernels). Returns the converted module names.

    Needs CUDA (compute capability ≥ 8.0) and fp16/bf16 weights (``dtype``; the model's linear
    weights are cast). **Raises** :class:`PruningError` on a machine without CUDA — there is no CPU
    kernel, so this cannot run on CPU, and this project's CI never calls it. Eligible: Linear
    layers (``layers``, default all) whose weight is on CUDA, already satisfies 2:4 along the input
    dimension and has both dimensions multiples of 64 (the kernels' minimum tile). Note: in reference
    measurements on an H100, 2:4 sparse matmuls in whole ViTs ran *slower* than dense; measure.
    """
    if not torch.cuda.is_available():
        raise PruningError("to_semi_structured needs a CUDA GPU (torch.sparse.to_sparse_semi_structured has no "
                           "CPU kernel); this machine has none. Keep the dense (zero-filled) weights on CPU.")
    from torch.sparse import to_sparse_semi_structured

    mods = dict(model.named_modules())
    names = list(layers) if layers is not None else [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    done = []
    for n in names:
        m = mods.get(n)
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        if not w.is_cuda or w.shape[0] % 64 or w.shape[1] % 64 or not is_nm(w.detach(), 2, 4):
            continue
        m.weight = nn.Parameter(to_sparse_semi_structured(w.detach().to(dtype)), requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        done.append(n)
    return done


def safetensors_size(model_or_state: nn.Module | Mapping[str, torch.Tensor], *, level: int = 6) -> dict:
    """Bytes on disk of the model's state dict saved as safetensors (dense storage), and the same
    file gzip- and zip(deflate)-compressed. Zeros are stored like any value, so an unstructured
    sparse model's safetensors file is exactly as large as the dense one; only compression (or a
    sparse format) shrinks it. Also returns ``nonzero_fraction`` over floating tensors and
    ``bitmap_estimate_bytes``: non-zero values + a 1-bit-per-weight bitmap (an *estimate* for a
    sparse format, nothing here writes it).
    """
    from safetensors.torch import save_file

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    # shared storage (tied weights) is rejected by save_file: clone so every key is its own tensor
    seen, clean = set(), {}
    for k, v in sd.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        clean[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    total = nonzero = 0
    est = 0
    for v in clean.values():
        if v.is_floating_point():
            nz = int(torch.count_nonzero(v))
            total += v.numel()
            nonzero += nz
            est += nz * v.element_size() + (v.numel() + 7) // 8
        else:
            est += v.numel() * v.element_size()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file(clean, str(path))
        raw = path.stat().st_size
        data = path.read_bytes()
    gz = len(gzip.compress(data, compresslevel=level))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        z.writestr("model.safetensors", data)
    return {"raw_bytes": raw, "gzip_bytes": gz, "zip_bytes": len(buf.getvalue()),
            "nonzero_fraction": nonzero / max(total, 1), "bitmap_estimate_bytes": int(est)}
