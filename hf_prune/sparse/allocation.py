"""Layer allocation for unstructured weight pruning: how sparse each layer is (method-free).

An *allocator* decides how sparse each layer is; it returns ``{layer name: sparsity}`` whose
pruned counts ``sparsity_l · n_l`` are integers summing **exactly** to ``round(sparsity · N)``
(``N`` = weights in the given layers). Selection inside a layer (magnitude, OBS) is separate
(:func:`hf_prune.sparse.masks.select_magnitude`, :func:`hf_prune.methods.ovit.obs.obs_prune_layer`).

* :func:`allocate_uniform` — every layer at the same sparsity (largest-remainder rounding).
* :func:`allocate_global` — global magnitude: one ``|w|`` threshold over all layers.
* :func:`allocate_lamp` — LAMP (Lee et al., ICLR 2021): score ``w_u² / Σ_{|w_v| ≥ |w_u|} w_v²``
  (sums inside the layer), one global threshold on the scores.
* :func:`allocate_erk` — Erdős–Rényi-Kernel (Evci et al., RigL 2020): density ∝
  ``Σ dims / Π dims`` of the weight shape, layers that would exceed density 1 are kept dense and the
  factor is re-solved.

The data-aware allocations live with their methods: RD's rate-distortion dynamic program
(:mod:`hf_prune.methods.rd`) and oViT's global OBS threshold (:mod:`hf_prune.methods.ovit`).

Allocators take ``weights: {name: weight tensor}``; weights already zero (masked) are counted by
the magnitude-based ones as the first to go, so repeated calls only grow masks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..core.checks import check_sparsity
from ..errors import PruningError
from .config import ALLOCATIONS
from .masks import exact_counts

__all__ = ["allocate_uniform", "allocate_global", "allocate_lamp", "allocate_erk", "ALLOCATORS", "allocate",
           "counts_to_sparsity"]


def _sizes(weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[int]]:
    names = list(weights)
    if not names:
        raise PruningError("no layers to allocate sparsity to")
    return names, [int(weights[n].numel()) for n in names]


def _already(weights: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor] | None) -> list[int]:
    if not keep:
        return [0] * len(weights)
    return [int(keep[n].numel() - int(keep[n].sum())) if n in keep else 0 for n in weights]


def counts_to_sparsity(names: list[str], sizes: list[int], counts: list[int]) -> dict[str, float]:
    return {n: c / s if s else 0.0 for n, s, c in zip(names, sizes, counts)}


def _target(sizes: list[int], sparsity: float, lower: list[int]) -> int:
    total = int(round(sparsity * sum(sizes)))
    return max(total, sum(lower))


def allocate_uniform(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """The same sparsity in every layer (counts rounded so that the total is exact)."""
    sparsity = check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = exact_counts(sizes, [sparsity * n for n in sizes], _target(sizes, sparsity, lower), lower=lower)
    return counts_to_sparsity(names, sizes, counts)


def _threshold_counts(scores: list[torch.Tensor], k: int) -> list[int]:
    """Per-tensor counts of the ``k`` globally smallest scores (ties at the threshold go to the
    tensors in order), without sorting all scores."""
    if k <= 0:
        return [0] * len(scores)
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    if k >= flat.numel():
        return [s.numel() for s in scores]
    tau = torch.kthvalue(flat, k).values
    below = [int((s < tau).sum()) for s in scores]
    ties = [int((s == tau).sum()) for s in scores]
    rest = k - sum(below)
    out = []
    for b, t in zip(below, ties):
        take = min(t, rest)
        out.append(b + take)
        rest -= take
    return out


def _masked_scores(weights, keep, fn) -> list[torch.Tensor]:
    out = []
    for n, w in weights.items():
        s = fn(w.detach().float().reshape(-1))
        if keep is not None and n in keep:
            s = s.masked_fill(~keep[n].reshape(-1).to(s.device), -1.0)
        out.append(s.cpu())
    return out


def allocate_global(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """Global magnitude: the ``round(sparsity · N)`` smallest ``|w|`` over all layers."""
    sparsity = check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = _threshold_counts(_masked_scores(weights, keep, torch.abs), _target(sizes, sparsity, lower))
    return counts_to_sparsity(names, sizes, counts)


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight of one layer (flat, same order as ``w.reshape(-1)``)."""
    sq = w.detach().float().reshape(-1) ** 2
    vals, order = torch.sort(sq)
    suffix = torch.flip(torch.cumsum(torch.flip(vals.double(), [0]), 0), [0])
    sc = torch.where(suffix > 0, vals.double() / suffix.clamp_min(1e-300), torch.zeros_like(suffix))
    out = torch.empty_like(sq)
    out[order] = sc.float()
    return out


def allocate_lamp(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """LAMP (Lee et al. 2021): global threshold on layer-adaptive magnitude scores."""
    sparsity = check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    counts = _threshold_counts(_masked_scores(weights, keep, lamp_scores), _target(sizes, sparsity, lower))
    return counts_to_sparsity(names, sizes, counts)


def erk_raw(shape) -> float:
    """Erdős–Rényi(-Kernel) density factor ``Σ dims / Π dims`` of a weight shape."""
    return sum(shape) / max(math.prod(shape), 1)


def allocate_erk(weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None,
                 power_scale: float = 1.0) -> dict[str, float]:
    """ERK (Evci et al. 2020): density_l = ε · (Σ dims / Π dims)^power_scale, capped at 1 (dense
    layers are fixed and ε re-solved until none exceeds 1); counts rounded to the exact total.
    Layers already sparser than ERK asks (masks only grow) keep their current count and the rest
    is re-distributed."""
    sparsity = check_sparsity(sparsity)
    names, sizes = _sizes(weights)
    lower = _already(weights, keep)
    total_pruned = _target(sizes, sparsity, lower)
    keep_budget = sum(sizes) - total_pruned
    raw = [erk_raw(tuple(weights[n].shape)) ** power_scale for n in names]
    cap = [1.0 - lo / n if n else 1.0 for lo, n in zip(lower, sizes)]  # most density a layer can have
    fixed: dict[int, float] = {}  # layers held at their cap (dense, or as dense as earlier masks allow)
    eps = 0.0
    for _ in range(len(names) + 1):
        free = [i for i in range(len(names)) if i not in fixed]
        rest = keep_budget - sum(fixed[i] * sizes[i] for i in fixed)
        denom = sum(raw[i] * sizes[i] for i in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [i for i in free if eps * raw[i] > cap[i]]
        if not over:
            break
        for i in over:
            fixed[i] = cap[i]
    wanted = []
    for i in range(len(names)):
        dens = fixed[i] if i in fixed else eps * raw[i]
        wanted.append((1.0 - min(max(dens, 0.0), 1.0)) * sizes[i])
    counts = exact_counts(sizes, wanted, total_pruned, lower=lower)
    return counts_to_sparsity(names, sizes, counts)


ALLOCATORS = {"global": allocate_global, "uniform": allocate_uniform, "lamp": allocate_lamp, "erk": allocate_erk}
assert tuple(ALLOCATORS) == ALLOCATIONS  # the names configs validate against


def allocate(name: str, weights: Mapping[str, torch.Tensor], sparsity: float, *, keep=None) -> dict[str, float]:
    """Dispatch to a data-free allocator by name (``uniform``, ``global``, ``lamp``, ``erk``)."""
    if name not in ALLOCATORS:
        raise PruningError(f"allocation={name!r} is not one of {sorted(ALLOCATORS)} (RD's allocation is "
                           "method='rd')")
    return ALLOCATORS[name](weights, sparsity, keep=keep)
