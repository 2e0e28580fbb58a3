"""RD: rate-distortion layer-adaptive weight pruning (Xu et al., ICCV 2023, arXiv 2308.10438).

The method decides *how sparse each layer is*; the weights removed inside a layer are the
smallest-magnitude ones, as in the paper.

1. **Distortion curves** (:func:`distortion_curves`). For every prunable layer ``l`` and every
   point ``s`` of a sparsity grid: magnitude-prune layer ``l`` alone to ``s`` (the other layers
   keep their current weights), run the calibration set, record the output distortion against the
   unpruned (current) model, restore the layer. Distortion of one sample = MSE of its logits;
   over the calibration set: ``reduction="max"`` (default) = worst case over samples, as in the
   authors' reported runs, or ``"mean"``.
2. **Additive model.** The distortion of pruning all layers is taken as ``Σ_l D_l(a_l)``.
3. **Dynamic program** (:func:`rd_dp`). Minimise ``Σ_l D_l(a_l)`` subject to ``Σ_l survivors_l ≤
   budget`` where ``budget = N − round(sparsity·N)``: ``dp[l, s] = min_g D_l[g] + dp[l−1, s −
   cost_l(g)]`` over the grid points ``g``, backtracked from ``dp[L, budget]``.

Departures from the paper / its code, all for memory and time on a CPU:

* **Budget quantisation.** The DP table has one column per unit of surviving weights. With
  ``unit = ceil(budget / max_states)`` (default ``max_states = 131072``) each layer's survivors are
  rounded *up* to whole units, so the DP's solution always fits the real budget; the table has
  ``L × (max_states + 1)`` entries (argmin table in int16/int32: ~14 MB for ResNet-50's 52 layers)
  instead of ``L × budget`` (tens of GB for ViT-B). ``unit=1`` is the exact DP.
* **Exact fill.** Grid and quantisation leave the DP's allocation slightly *sparser* than asked.
  With ``fill=True`` (default) the surplus pruned weights are given back, layer by layer, where the
  curve between the chosen grid point and the next denser one is steepest (linear interpolation of
  the measured curve), so the total number of pruned weights is exactly ``round(sparsity·N)``.
* **Grid.** ``grid`` points evenly spaced on ``[0, max_sparsity]`` (the paper's code: 101 points,
  step 0.01, up to 1.0 — a whole layer may be pruned; ``max_sparsity`` < 1 forbids that). The
  curve cost is ``L × grid`` forward passes of the calibration set: on a 2-core CPU use fewer
  points and a small calibration batch (the benchmark records what it used).
* Layers are processed in model order, not sorted by size (the DP's optimum does not depend on the
  order). Calibration data are real images from ``calib``; the paper's zero-data variant (Gaussian
  noise inputs) is just ``calib`` filled with noise.
* Gradual use (:class:`~hf_prune.methods.rd.callback.RDCallback`) re-measures curves and re-solves the DP at each pruning step of
  a cubic/linear schedule, with masks that only grow (curves start at the current sparsity); the
  paper's iterative schedule is ``1 − (1 − amount)^t`` with fine-tuning between iterations.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import PruningError
from ...core.execution import module_modes, restore_modes
from ...sparse.masks import WeightMasks, exact_counts, forward_logits, iter_batches, prunable_layers
from .config import REDUCTIONS

logger = logging.getLogger(__name__)

__all__ = ["RDCurves", "distortion_curves", "rd_dp", "allocate_rd", "REDUCTIONS"]
DEFAULT_MAX_STATES = 131072


@dataclass
class RDCurves:
    """Measured distortion curves: for layer ``i``, ``pruned[i][g]`` weights pruned gives
    distortion ``distortion[i][g]`` (grid points ascending, duplicates removed)."""

    names: list[str]
    sizes: list[int]
    pruned: list[list[int]]
    distortion: list[list[float]]
    reduction: str = "max"
    seconds: float = 0.0
    forwards: int = 0
    samples: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"names": self.names, "sizes": self.sizes, "pruned": self.pruned, "distortion": self.distortion,
                "reduction": self.reduction, "seconds": self.seconds, "forwards": self.forwards,
                "samples": self.samples}


def _grid(grid, max_sparsity: float) -> list[float]:
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"grid={grid} must be >= 2 points")
        return [max_sparsity * i / (grid - 1) for i in range(grid)]
    pts = sorted(float(g) for g in grid)
    if not pts or pts[0] < 0 or pts[-1] > 1:
        raise ValueError(f"grid={grid!r} must be sparsities in [0, 1]")
    return pts


def _resolve(model: nn.Module, layers, masks: WeightMasks | None) -> tuple[list[str], WeightMasks | None]:
    if masks is not None:
        names = list(layers) if layers is not None else masks.layers
        return names, masks
    names = list(layers) if layers is not None else list(prunable_layers(model))
    return names, None


def _sample_distortion(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    return ((y.float() - y0).reshape(y.shape[0], -1) ** 2).mean(dim=1)


@torch.no_grad()
def distortion_curves(model: nn.Module, calib, *, layers: Sequence[str] | None = None,
                      masks: WeightMasks | None = None, grid: int | Sequence[float] = 21, max_sparsity: float = 1.0,
                      reduction: str = "max", max_batches: int | None = None, log_every: int = 0) -> RDCurves:
    """Per-layer output-distortion curves on ``calib`` (see the module docstring).

    ``layers``: module names (default: ``masks.layers`` or :func:`prunable_layers`). With ``masks``,
    weights already masked stay pruned: each curve starts at the layer's current sparsity (grid
    points below it are clamped to it, distortion 0). Every weight is restored afterwards (the
    model is unchanged). Cost: ``Σ_l (distinct grid points of l) × len(calib)`` forward passes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    if not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity={max_sparsity!r} must be in (0, 1]")
    names, masks = _resolve(model, layers, masks)
    points = _grid(grid, max_sparsity)
    mods = dict(model.named_modules())
    device = next(model.parameters()).device
    batches = [inp for inp, _ in iter_batches(calib, max_batches, device)]
    if not batches:
        raise PruningError("calib yielded no batches")
    modes = module_modes(model)
    model.eval()
    t0 = time.perf_counter()
    forwards = 0
    try:
        refs = [forward_logits(model, b).float() for b in batches]
        samples = sum(r.shape[0] for r in refs)

        def measure() -> float:
            per = torch.cat([_sample_distortion(forward_logits(model, b), r) for b, r in zip(batches, refs)])
            return float(per.max() if reduction == "max" else per.mean())

        pruned_all, dist_all, sizes = [], [], []
        for li, name in enumerate(names):
            w = mods[name].weight
            n = w.numel()
            contiguous = w.is_contiguous()
            flat = w.data.view(-1) if contiguous else w.data.flatten()  # a copy for strided layouts

            def sync() -> None:
                if not contiguous:
                    w.data.copy_(flat.view(w.shape))

            saved = flat.clone()
            score = flat.abs().float()
            keep = masks[name].reshape(-1) if masks is not None and name in masks else None
            if keep is not None:
                score = score.masked_fill(~keep.to(score.device), -1.0)
            p0 = int(n - int(keep.sum())) if keep is not None else 0
            order = torch.argsort(score, stable=True)
            ks = sorted({max(p0, int(round(s * n))) for s in points} | {p0})
            dists, done = [], p0
            try:
                for k in ks:
                    if k > done:
                        flat[order[done:k]] = 0
                        done = k
                        sync()
                    if k == p0:
                        dists.append(0.0)  # the current model itself: no distortion by definition
                        continue
                    dists.append(measure())
                    forwards += len(batches)
            finally:
                flat.copy_(saved)
                sync()
            pruned_all.append(ks)
            dist_all.append(dists)
            sizes.append(n)
            if log_every and (li + 1) % log_every == 0:
                logger.info("rd: curves %d/%d layers, %.1fs", li + 1, len(names), time.perf_counter() - t0)
    finally:
        restore_modes(modes)
    return RDCurves(names=list(names), sizes=sizes, pruned=pruned_all, distortion=dist_all, reduction=reduction,
                    seconds=time.perf_counter() - t0, forwards=forwards, samples=samples)


def rd_dp(distortion: Sequence[Sequence[float]], survivors: Sequence[Sequence[int]], budget: int, *,
          unit: int = 1, info: dict | None = None) -> tuple[list[int], float]:
    """Minimise ``Σ_l distortion[l][g_l]`` s.t. ``Σ_l ceil(survivors[l][g_l] / unit) ≤ budget // unit``.

    Returns the chosen grid index per layer and the minimal total distortion. With ``unit=1`` this
    is the exact problem ``Σ survivors ≤ budget``. Memory: an argmin table of ``L × (budget//unit + 1)``
    small ints (reported in ``info["table_bytes"]``) plus two float64 rows.
    """
    L = len(distortion)
    if L == 0 or L != len(survivors):
        raise ValueError("distortion and survivors must be non-empty lists of the same length")
    if unit < 1:
        raise ValueError(f"unit={unit} must be >= 1")
    S = int(budget) // int(unit)
    if S < 0:
        raise PruningError(f"budget={budget} is negative")
    gmax = max(len(d) for d in distortion)
    idx_dtype = torch.int16 if gmax < 2 ** 15 else torch.int32
    choice = torch.zeros((L, S + 1), dtype=idx_dtype)
    costs = []
    dp = torch.zeros(S + 1, dtype=torch.float64)  # no layer yet: distortion 0 for every capacity
    for l in range(L):
        d = torch.as_tensor(distortion[l], dtype=torch.float64)
        c = [-(-int(x) // unit) for x in survivors[l]]  # ceil: the quantised solution fits the real budget
        if len(c) != d.numel():
            raise ValueError(f"layer {l}: {d.numel()} distortions but {len(c)} survivor counts")
        costs.append(c)
        new = torch.full((S + 1,), math.inf, dtype=torch.float64)
        arg = choice[l]
        for g, cg in enumerate(c):
            if cg > S:
                continue
            cand = dp[: S + 1 - cg] + d[g]
            tail = new[cg:]
            better = cand < tail
            new[cg:] = torch.where(better, cand, tail)
            arg[cg:][better] = g
        dp = new
    total = float(dp[S])
    if not math.isfinite(total):
        raise PruningError(f"no allocation fits the budget of {budget} surviving weights: even the sparsest grid "
                           f"point of every layer keeps more (raise max_sparsity or lower the sparsity target)")
    picks = [0] * L
    s = S
    for l in range(L - 1, -1, -1):
        g = int(choice[l, s])
        picks[l] = g
        s -= costs[l][g]
    if info is not None:
        info.update(states=S + 1, unit=int(unit), table_bytes=int(choice.numel() * choice.element_size()))
    return picks, total


def _fill(curves: RDCurves, picks: list[int], target_pruned: int, lower: list[int]) -> list[int]:
    """Pruned counts per layer with ``Σ = target_pruned`` exactly: start from the DP's grid points
    (which prune at least ``target_pruned``) and give the surplus back where the linearly
    interpolated curve drops fastest towards the next denser grid point."""
    counts = [curves.pruned[i][g] for i, g in enumerate(picks)]
    surplus = sum(counts) - target_pruned
    if surplus < 0:  # pragma: no cover - the DP's budget guarantees surplus >= 0
        raise PruningError("RD allocation prunes fewer weights than asked")
    if surplus == 0:
        return counts
    slopes = []
    for i, g in enumerate(picks):
        if g == 0:
            continue
        dk = curves.pruned[i][g] - curves.pruned[i][g - 1]
        dd = curves.distortion[i][g] - curves.distortion[i][g - 1]
        room = min(dk, counts[i] - lower[i])
        if room > 0:
            slopes.append((-(dd / dk), i, room))
    for _, i, room in sorted(slopes):
        give = min(room, surplus)
        counts[i] -= give
        surplus -= give
        if surplus == 0:
            break
    if surplus:  # fall back to any layer with room above its current sparsity
        wanted = [float(c) for c in counts]
        counts = exact_counts(curves.sizes, wanted, target_pruned, lower=lower)
    return counts


def allocate_rd(model: nn.Module, sparsity: float, calib=None, *, layers: Sequence[str] | None = None,
                masks: WeightMasks | None = None, curves: RDCurves | None = None, grid: int | Sequence[float] = 21,
                max_sparsity: float = 1.0, reduction: str = "max", max_batches: int | None = None,
                unit: int | None = None, max_states: int = DEFAULT_MAX_STATES, fill: bool = True,
                info: dict | None = None) -> dict[str, float]:
    """RD allocation ``{layer: sparsity}`` for a global ``sparsity`` over ``layers``.

    Measures :func:`distortion_curves` (unless ``curves`` are given), solves :func:`rd_dp` on the
    survivor budget (``unit`` weights per DP state; default ``ceil(budget / max_states)``), then
    (``fill``) makes the total exact. ``info`` (a dict) receives timings, the DP size, the chosen
    grid points, the predicted total distortion and the curves.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    names, masks = _resolve(model, layers, masks)
    if curves is None:
        curves = distortion_curves(model, calib, layers=names, masks=masks, grid=grid, max_sparsity=max_sparsity,
                                   reduction=reduction, max_batches=max_batches)
    elif curves.names != list(names):
        raise PruningError("the given curves were measured on other layers")
    N = sum(curves.sizes)
    target = int(round(sparsity * N))
    lower = [c[0] for c in curves.pruned]  # current pruned counts (curves start there)
    target = max(target, sum(lower))
    budget = N - target
    t0 = time.perf_counter()
    if unit is None:
        unit = max(1, -(-budget // max(int(max_states), 1)))
    dp_info: dict = {}
    survivors = [[n - k for k in ks] for n, ks in zip(curves.sizes, curves.pruned)]
    picks, total = rd_dp(curves.distortion, survivors, budget, unit=unit, info=dp_info)
    counts = _fill(curves, picks, target, lower) if fill else [curves.pruned[i][g] for i, g in enumerate(picks)]
    dp_seconds = time.perf_counter() - t0
    if info is not None:
        info.update(curve_seconds=curves.seconds, dp_seconds=dp_seconds, forwards=curves.forwards,
                    predicted_distortion=total, picks=picks, curves=curves, **dp_info)
    return {n: c / s for n, s, c in zip(curves.names, curves.sizes, counts)}
