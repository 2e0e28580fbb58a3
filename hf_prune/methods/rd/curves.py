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
4. **Iterative schedule** (``allocate_rd(..., rounds=k)``, :func:`~hf_prune.core.schedules.geometric_targets`):
   the paper prunes in rounds to ``1 − (1 − a)^t``, re-measuring the curves on the pruned model each
   round (and fine-tuning between rounds when training; in one shot, without).

How the curves are measured fast, and what is exact (:mod:`hf_prune.methods.rd.replay`):

* **Prefix reuse.** Changing layer ``l`` leaves every module call that finishes before ``l``'s first
  call unchanged, so per calibration batch the prefix runs once per layer (about one forward pass
  over all layers together) and only layer ``l`` and what follows it are re-run per grid point.
* **Grid batching.** Up to ``max_batch_mb`` of activations, several grid points run in *one* forward
  pass: the cached prefix outputs are repeated along the batch dimension, layer ``l`` applies each
  chunk's own masked weight, and the rest of the network runs on the larger batch. This pays off for
  small activations, where a pass costs its per-operation overhead (a 75K-parameter ViT); for
  ImageNet-size activations repeating the cached outputs costs more than it saves (measured: ResNet-50
  at 224 ran slower with 2 grid points per pass), so the default budget (16 MiB, counted as 4× the
  largest activation of a sample) gives those models one grid point per pass.
* Both are exact: the distortion is the *network's* output distortion, as in the paper, not a layer-
  output proxy; only the order of floating-point operations changes (kernels at another batch size).
  Every layer is checked first on a probe of two calibration samples: its unchanged weight, twice in
  one batched pass from the cached prefix, must reproduce the plain forward pass (to 1e-3 of the
  logits' scale); a layer that fails (a model whose later code reads something the skipped prefix
  would have set, a reshape with a fixed batch size) is measured with plain forward passes, with a
  warning, and so is any layer whose replay raises later. ``reuse_prefix=False`` measures
  every layer that way (the reference, used by the tests).
* The cost is ``Σ_l (grid points of l) × (cost of the network after l)`` on the calibration set,
  instead of ``L × grid`` full passes; the approximation is only the paper's (additive distortion).

Departures from the paper / its code:

* **No layer is disconnected** (``min_per_row``, default 2). The paper's grid reaches 100% and its DP
  may remove a whole layer (on a small CNN at 90% this sent a conv to 100% and accuracy to chance).
  Here, inside each layer, the ``min_per_row`` largest weights of every output unit (a row of a Linear
  weight, an output channel of a conv) are ranked last, so a layer's grid stops at
  ``n − rows · min_per_row`` pruned weights and no output unit loses all its weights; the same order
  selects the final masks (:func:`select_connected`). ``min_per_row=0`` is the paper's uncapped grid.
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
  step 0.01). On a 2-core CPU use fewer points and a small calibration set (the benchmarks record
  what they used).
* Layers are processed in model order, not sorted by size (the DP's optimum does not depend on the
  order). Calibration data are real images from ``calib``; the paper's zero-data variant (Gaussian
  noise inputs) is just ``calib`` filled with noise.
* Gradual use (:class:`~hf_prune.methods.rd.callback.RDCallback`) re-measures curves and re-solves the DP at
  each pruning step, with masks that only grow (curves start at the current sparsity);
  :class:`~hf_prune.core.schedules.Geometric` (``schedule="geometric"``) is the paper's iterative schedule as a training schedule.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.execution import eval_mode
from ...core.schedules import geometric_targets
from ...core.inputs import batch_size
from ...core.progress import progress
from ...errors import PruningError
from ...sparse.masks import WeightMasks, exact_counts, forward_logits, iter_batches, prunable_layers, select_magnitude
from .config import REDUCTIONS
from .replay import CacheModified, FrontierCache, Replayer, ReplayError, map_tensors

logger = logging.getLogger(__name__)

__all__ = ["RDCurves", "distortion_curves", "rd_dp", "allocate_rd", "connected_scores", "select_connected",
           "apply_rd_allocation", "REDUCTIONS", "DEFAULT_MIN_PER_ROW"]
DEFAULT_MAX_STATES = 131072
DEFAULT_MIN_PER_ROW = 2
DEFAULT_MAX_BATCH_MB = 16.0
_CHECK_RTOL = 1e-3  # batched/prefix-reusing pass vs plain pass, relative to the logits' scale


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


def _resolve(model: nn.Module, layers, masks) -> tuple[list[str], Mapping | None]:
    """Layer names and keep-masks (a :class:`WeightMasks` or a plain ``{name: keep}``)."""
    if masks is not None:
        if layers is not None:
            return list(layers), masks
        return (masks.layers if isinstance(masks, WeightMasks) else list(masks)), masks
    return (list(layers) if layers is not None else list(prunable_layers(model))), None


def _check_min_per_row(min_per_row) -> int:
    if isinstance(min_per_row, bool) or not isinstance(min_per_row, int) or min_per_row < 0:
        raise ValueError(f"min_per_row={min_per_row!r} must be an int >= 0: the weights every output unit of a "
                         "layer keeps (0 allows pruning whole layers, as the paper's grid does)")
    return min_per_row


# ----------------------------------------------------------------------------------------- within-layer order


def connected_scores(weight: torch.Tensor, keep: torch.Tensor | None = None,
                     min_per_row: int = DEFAULT_MIN_PER_ROW) -> tuple[torch.Tensor, int]:
    """Flat float32 scores of RD's within-layer order (smallest pruned first) and the number of
    protected weights: ``|w|``, already-masked weights at ``-1`` (first to go) and each output unit's
    ``min_per_row`` largest kept weights above every other weight (last to go)."""
    w = weight.detach()
    score = w.abs().float().reshape(-1)
    kept = None if keep is None else keep.reshape(-1).to(score.device)
    if kept is not None:
        score = score.masked_fill(~kept, -1.0)
    if min_per_row <= 0 or w.dim() == 0:
        return score, 0
    rows = score.view(w.shape[0], -1)
    k = min(int(min_per_row), rows.shape[1])
    top = rows.topk(k, dim=1).indices
    protected = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, top, True).reshape(-1)
    if kept is not None:
        protected &= kept  # a row with fewer kept weights than min_per_row protects only those
    score = torch.where(protected, score + (score.max().clamp_min(0) + 1.0), score)
    return score, int(protected.sum())


def _protected_count(weight: torch.Tensor, keep: torch.Tensor | None, min_per_row: int) -> int:
    """How many weights :func:`connected_scores` protects: ``min(min_per_row, kept in the row)`` per row."""
    if min_per_row <= 0 or weight.dim() == 0:
        return 0
    rows = weight.shape[0]
    if keep is None:
        return rows * min(min_per_row, weight.numel() // max(rows, 1))
    return int(keep.reshape(rows, -1).sum(1).clamp(max=min_per_row).sum())


def select_connected(weight: torch.Tensor, sparsity: float, *, keep: torch.Tensor | None = None,
                     min_per_row: int = DEFAULT_MIN_PER_ROW) -> torch.Tensor:
    """Keep-mask pruning ``round(sparsity · n)`` weights of ``weight`` in RD's order
    (:func:`connected_scores`: magnitude, masked first, every output unit's ``min_per_row`` largest
    last). Refuses a sparsity that would empty an output unit."""
    scores, protected = connected_scores(weight, keep, min_per_row)
    n = weight.numel()
    if int(round(float(sparsity) * n)) > n - protected:
        raise PruningError(f"sparsity={sparsity:.6f} of a {tuple(weight.shape)} weight prunes more than the "
                           f"{n - protected} weights that leave every output unit {min_per_row} weights; lower it "
                           "or min_per_row")
    return select_magnitude(weight, sparsity, keep=keep, scores=scores.view(weight.shape))


def apply_rd_allocation(masks: WeightMasks, allocation: Mapping[str, float], *,
                        min_per_row: int = DEFAULT_MIN_PER_ROW) -> None:
    """Grow ``masks`` to ``allocation`` (``{layer: sparsity}``, e.g. from :func:`allocate_rd`) with
    :func:`select_connected`, the order the curves were measured in; weights are not changed (call
    ``masks.enforce()``)."""
    for n in masks.layers:
        masks.set(n, select_connected(masks.weight(n), allocation.get(n, 0.0), keep=masks[n],
                                      min_per_row=min_per_row))


# ----------------------------------------------------------------------------------------- curves


class _LayerGrid:
    """One layer's grid: the removal order, the pruned counts to measure (``ks``, ascending, starting
    at the current count ``p0``), and in-place masking of its weight to any of them."""

    def __init__(self, weight: torch.Tensor, keep, points: list[float], min_per_row: int):
        self.w = weight
        self.n = n = weight.numel()
        scores, protected = connected_scores(weight, keep, min_per_row)
        self.p0 = int(n - int(keep.sum())) if keep is not None else 0
        self.kmax = max(self.p0, n - protected)
        self.order = torch.argsort(scores, stable=True)[: self.kmax].to(weight.device)
        self.ks = sorted({min(self.kmax, max(self.p0, int(round(s * n)))) for s in points} | {self.p0})
        self.contiguous = weight.is_contiguous()
        self._flat = None
        self._saved = None
        self.done = self.p0

    def __enter__(self) -> "_LayerGrid":
        w = self.w
        self._flat = w.data.view(-1) if self.contiguous else w.data.flatten()  # a copy for strided layouts
        self._saved = self._flat.clone()
        self.done = self.p0
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
        self._flat = self._saved = None

    def _sync(self) -> None:
        if not self.contiguous:
            self.w.data.copy_(self._flat.view(self.w.shape))

    def prune_to(self, k: int) -> None:
        if k < self.done:
            self.reset()
        if k > self.done:
            self._flat.index_fill_(0, self.order[self.done:k], 0)
            self.done = k
            self._sync()

    def reset(self) -> None:
        if self._saved is not None and self.done != self.p0:
            self._flat.copy_(self._saved)
            self.done = self.p0
            self._sync()


def _sample_distortion(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    return ((y.float() - y0).reshape(y.shape[0], -1) ** 2).mean(dim=1)


class _CurveMeter:
    """Measures per-sample distortions of one calibration batch for every layer, with the prefix
    reused and several grid points per pass, or with plain passes (the reference and the fallback)."""

    def __init__(self, model: nn.Module, replayer: Replayer | None, max_batch_mb: float):
        self.model, self.replayer, self.max_batch_mb = model, replayer, max_batch_mb
        self.forwards = 0
        self.max_variants = 0
        self.fallback: dict[str, str] = {}

    def reference(self, batch, b: int) -> torch.Tensor:
        self.forwards += 1
        if self.replayer is not None:
            return self.replayer.trace(batch, b).float()
        return forward_logits(self.model, batch).float()

    def plain(self, batch, ref: torch.Tensor, grid: _LayerGrid, ks: list[int]) -> list[torch.Tensor]:
        out = []
        for k in ks:
            grid.prune_to(k)
            out.append(_sample_distortion(forward_logits(self.model, batch), ref))
            self.forwards += 1
        grid.reset()
        return out

    def variants_per_pass(self, b: int) -> int:
        per_row = max(self.replayer.trace_.activation_bytes_per_sample(), 1) * 4  # a few live activations
        rows = int(self.max_batch_mb * 2 ** 20 // per_row)
        return max(1, rows // max(b, 1))

    def replayed(self, batch, call: int, cache: FrontierCache, measure) -> tuple[FrontierCache, object]:
        """The frontier of ``call`` recorded from ``cache`` on, and ``measure(frontier)``; when a cached
        output was changed in place, once more from scratch with cached outputs copied from then on."""
        try:
            cache = self.replayer.record(batch, call, cache)
            return cache, measure(cache)
        except CacheModified:
            self.replayer.copy_cached = True
            cache = self.replayer.record(batch, call, FrontierCache())
            return cache, measure(cache)

    def _pass(self, batch, grid: _LayerGrid, chunk: list[int], layer: int, cache: FrontierCache,
              b: int) -> torch.Tensor:
        """Logits ``(len(chunk), b, ...)``: one pass from the cached prefix, variant ``chunk[i]`` of the
        layer's weight on the ``i``-th copy of the batch."""

        def layer_fn(forward, args, kwargs):
            if not args or args[0].shape[0] != len(chunk) * b:
                raise ReplayError("the layer's input is not batched along its first dimension")
            outs = []
            for x, k in zip(args[0].chunk(len(chunk)), chunk):
                grid.prune_to(k)
                outs.append(forward(x, *args[1:], **kwargs))
            grid.reset()
            return torch.cat(outs)

        try:
            y = self.replayer.run(batch, cache, layer=layer, repeat=len(chunk), layer_fn=layer_fn)
        finally:
            grid.reset()
        self.forwards += 1
        self.max_variants = max(self.max_variants, len(chunk))
        if y.shape[0] != len(chunk) * b:
            raise ReplayError(f"the model returned {y.shape[0]} rows for {len(chunk)} x {b}")
        return y.float().view(len(chunk), b, *y.shape[1:])

    def batched(self, batch, ref: torch.Tensor, grid: _LayerGrid, ks: list[int], layer: int,
                cache: FrontierCache) -> list[torch.Tensor]:
        b = ref.shape[0]
        step = self.variants_per_pass(b)
        out = []
        for c0 in range(0, len(ks), step):
            y = self._pass(batch, grid, ks[c0:c0 + step], layer, cache, b)
            out.extend(_sample_distortion(part, ref) for part in y)
        return out

    def check(self, probe, names: list[str], mods: dict, grids: list[_LayerGrid], warn) -> None:
        """Every layer on a small ``probe`` batch: the unchanged weight, twice in one batched pass from
        the cached prefix, must reproduce the plain pass (else the layer is measured plainly)."""
        b = batch_size(probe)
        ref = self.reference(probe, b)
        scale = float(ref.abs().max()) + 1e-12
        calls = {li: self.replayer.trace_.first_call(mods[n]) for li, n in enumerate(names)}
        cache = FrontierCache()
        for li in sorted((li for li in calls if calls[li] is not None), key=calls.get):
            g = grids[li]
            try:
                with g:
                    cache, y = self.replayed(probe, calls[li], cache,
                                             lambda c: self._pass(probe, g, [g.p0, g.p0], calls[li], c, b))
                err = float((y - ref).abs().max())
                if err > _CHECK_RTOL * scale:
                    raise ReplayError(f"the prefix-reusing pass differs from the plain pass by {err:.3g} "
                                      f"(logits scale {scale:.3g})")
            except Exception as exc:  # noqa: BLE001 - any failure of the replay: this layer runs plain passes
                self.fallback[names[li]] = f"{type(exc).__name__}: {exc}"
                warn(names[li], exc)
                cache = FrontierCache()


def _probe(batch, rows: int = 2):
    """The first ``rows`` samples of a batch (tensors whose first dimension is the batch size)."""
    b = batch_size(batch)

    def head(t: torch.Tensor) -> torch.Tensor:
        return t[:rows] if t.dim() >= 1 and t.shape[0] == b else t

    return map_tensors(head, batch)


def _warn_plain(name: str, exc: BaseException) -> None:
    warnings.warn(f"RD curves: layer {name!r} is measured with plain forward passes ({type(exc).__name__}: {exc})",
                  stacklevel=5)


@torch.no_grad()
def distortion_curves(model: nn.Module, calib, *, layers: Sequence[str] | None = None,
                      masks: WeightMasks | Mapping[str, torch.Tensor] | None = None,
                      grid: int | Sequence[float] = 21, max_sparsity: float = 1.0,
                      min_per_row: int = DEFAULT_MIN_PER_ROW, reduction: str = "max", max_batches: int | None = None,
                      reuse_prefix: bool = True, max_batch_mb: float = DEFAULT_MAX_BATCH_MB,
                      show_progress: bool | None = None, log_every: int = 0) -> RDCurves:
    """Per-layer output-distortion curves on ``calib`` (see the module docstring).

    ``layers``: module names (default: the masks' layers or :func:`prunable_layers`). With ``masks``
    (a :class:`WeightMasks` or ``{name: keep}``), weights already masked stay pruned: each curve
    starts at the layer's current sparsity (grid points below it are clamped to it, distortion 0).
    Grid points above ``n − rows · min_per_row`` are clamped to it (no output unit is emptied).
    ``reuse_prefix`` runs only the layer and what follows it, several grid points per pass, within
    about ``max_batch_mb`` MiB of activations; ``False`` runs one plain forward pass per grid point.
    ``show_progress``: a progress bar (default: :func:`hf_prune.core.progress.progress_enabled`).
    Every weight is restored afterwards (the model is unchanged).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    if not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity={max_sparsity!r} must be in (0, 1]")
    if not max_batch_mb > 0:
        raise ValueError(f"max_batch_mb={max_batch_mb!r} must be > 0 (MiB of activations per batched pass)")
    min_per_row = _check_min_per_row(min_per_row)
    names, masks = _resolve(model, layers, masks)
    points = _grid(grid, max_sparsity)
    mods = dict(model.named_modules())
    device = next(model.parameters()).device
    batches = [inp for inp, _ in iter_batches(calib, max_batches, device)]
    if not batches:
        raise PruningError("calib yielded no batches")
    grids = [_LayerGrid(mods[n].weight, masks[n] if masks is not None and n in masks else None, points, min_per_row)
             for n in names]
    per_sample: list[list[list[torch.Tensor]]] = [[[] for _ in g.ks] for g in grids]
    t0 = time.perf_counter()
    replayer = Replayer(model) if reuse_prefix else None
    meter = _CurveMeter(model, replayer, max_batch_mb)
    bar = progress(total=len(batches) * len(names), desc="RD distortion curves",
                   disable=None if show_progress is None else not show_progress)
    try:
        with eval_mode(model), (replayer if replayer is not None else contextlib.nullcontext()):
            if replayer is not None:
                meter.check(_probe(batches[0]), names, mods, grids, _warn_plain)
            for batch in batches:
                _measure_batch(meter, batch, names, mods, grids, per_sample, bar, t0, log_every)
    finally:
        bar.close()
    samples = sum(len(x) for x in per_sample[0][0]) if per_sample and per_sample[0] else 0
    return RDCurves(names=list(names), sizes=[g.n for g in grids], pruned=[list(g.ks) for g in grids],
                    distortion=_reduce(grids, per_sample, reduction), reduction=reduction,
                    seconds=time.perf_counter() - t0,
                    forwards=meter.forwards, samples=samples,
                    extra={"fallback_layers": dict(meter.fallback), "reuse_prefix": bool(reuse_prefix),
                           "max_variants_per_pass": meter.max_variants,
                           "copied_cache": bool(replayer is not None and replayer.copy_cached),
                           "max_pruned": [g.kmax for g in grids], "min_per_row": min_per_row})


def _reduce(grids: list[_LayerGrid], per_sample, reduction: str) -> list[list[float]]:
    """Each curve point's per-sample distortions reduced over the calibration set (the current
    weights' point is 0 by definition)."""
    out = []
    for g, lists in zip(grids, per_sample):
        out.append([0.0 if k == g.p0 else float(torch.cat(parts).max() if reduction == "max"
                                                 else torch.cat(parts).mean()) for k, parts in zip(g.ks, lists)])
    return out


def _measure_batch(meter: _CurveMeter, batch, names, mods, grids, per_sample, bar, t0, log_every: int) -> None:
    """All layers' distortions on one calibration batch, appended to ``per_sample``."""
    b = batch_size(batch)
    ref = meter.reference(batch, b)
    replayer = meter.replayer
    if replayer is not None:
        calls = {li: replayer.trace_.first_call(mods[n]) for li, n in enumerate(names)}
        order = sorted(range(len(names)), key=lambda li: (calls[li] is None, calls[li] or 0))
    else:
        calls, order = {}, list(range(len(names)))
    cache = FrontierCache()
    for done, li in enumerate(order, 1):
        name, g = names[li], grids[li]
        ks = [k for k in g.ks if k != g.p0]
        with g:
            if replayer is not None and calls[li] is None:  # never called: pruning it changes nothing
                got = [torch.zeros(ref.shape[0]) for _ in ks]
            elif replayer is None or name in meter.fallback:
                got = meter.plain(batch, ref, g, ks)
            else:
                try:
                    cache, got = meter.replayed(batch, calls[li], cache,
                                                lambda c: meter.batched(batch, ref, g, ks, calls[li], c))
                except Exception as exc:  # noqa: BLE001 - e.g. a batch of another size: the plain passes decide
                    meter.fallback[name] = f"{type(exc).__name__}: {exc}"
                    _warn_plain(name, exc)
                    cache = FrontierCache()
                    got = meter.plain(batch, ref, g, ks)
        it = iter(got)
        for j, k in enumerate(g.ks):
            per_sample[li][j].append(torch.zeros(ref.shape[0]) if k == g.p0 else next(it).cpu())
        bar.update(1)
        if log_every and done % log_every == 0:
            logger.info("rd: curves %d/%d layers, %.1fs", done, len(names), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------- DP


def rd_dp(distortion: Sequence[Sequence[float]], survivors: Sequence[Sequence[int]], budget: int, *,
          unit: int = 1, min_survivors: Sequence[int] | None = None, info: dict | None = None) -> tuple[list[int], float]:
    """Minimise ``Σ_l distortion[l][g_l]`` s.t. ``Σ_l ceil(survivors[l][g_l] / unit) ≤ budget // unit``.

    Returns the chosen grid index per layer and the minimal total distortion. With ``unit=1`` this
    is the exact problem ``Σ survivors ≤ budget``. ``min_survivors[l]``: grid points of layer ``l``
    keeping fewer weights are not allowed (the per-layer cap). Memory: an argmin table of
    ``L × (budget//unit + 1)`` small ints (reported in ``info["table_bytes"]``) plus two float64 rows.
    """
    L = len(distortion)
    if L == 0 or L != len(survivors):
        raise ValueError("distortion and survivors must be non-empty lists of the same length")
    if min_survivors is not None and len(min_survivors) != L:
        raise ValueError(f"min_survivors has {len(min_survivors)} entries for {L} layers")
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
        floor = 0 if min_survivors is None else int(min_survivors[l])
        new = torch.full((S + 1,), math.inf, dtype=torch.float64)
        arg = choice[l]
        for g, cg in enumerate(c):
            if cg > S or int(survivors[l][g]) < floor:
                continue
            cand = dp[: S + 1 - cg] + d[g]
            tail = new[cg:]
            better = cand < tail
            new[cg:] = torch.where(better, cand, tail)
            arg[cg:][better] = g
        dp = new
    total = float(dp[S])
    if not math.isfinite(total):
        raise PruningError(f"no allocation fits the budget of {budget} surviving weights: even the sparsest allowed "
                           "grid point of every layer keeps more (lower the sparsity target, or min_per_row / raise "
                           "max_sparsity)")
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


def _check_fraction(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    return float(sparsity)


def allocate_rd(model: nn.Module, sparsity: float, calib=None, *, layers: Sequence[str] | None = None,
                masks: WeightMasks | Mapping[str, torch.Tensor] | None = None, curves: RDCurves | None = None,
                grid: int | Sequence[float] = 21, max_sparsity: float = 1.0, min_per_row: int = DEFAULT_MIN_PER_ROW,
                reduction: str = "max", max_batches: int | None = None, rounds: int = 1, unit: int | None = None,
                max_states: int = DEFAULT_MAX_STATES, fill: bool = True, reuse_prefix: bool = True,
                max_batch_mb: float = DEFAULT_MAX_BATCH_MB, show_progress: bool | None = None,
                info: dict | None = None) -> dict[str, float]:
    """RD allocation ``{layer: sparsity}`` for a global ``sparsity`` over ``layers``.

    Measures :func:`distortion_curves` (unless ``curves`` are given), solves :func:`rd_dp` on the
    survivor budget (``unit`` weights per DP state; default ``ceil(budget / max_states)``), then
    (``fill``) makes the total exact. No layer's grid goes beyond ``n − rows · min_per_row`` pruned
    weights (also for given ``curves``). ``rounds=k`` is the paper's iterative schedule in one shot:
    prune to :func:`~hf_prune.core.schedules.geometric_targets` targets ``1 − (1 − a)^t`` one round at a
    time (RD's order, :func:`select_connected`), re-measuring the curves on the pruned model each
    round; the weights are restored at the end and the last round's allocation returned (it contains
    every earlier round's pruned weights). ``info`` (a dict) receives timings, the DP size, the chosen
    grid points, the predicted total distortion and the curves (with ``rounds``: a list per round).
    """
    sparsity = _check_fraction(sparsity)
    min_per_row = _check_min_per_row(min_per_row)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (pruning rounds of the iterative schedule)")
    names, masks = _resolve(model, layers, masks)
    opts = dict(grid=grid, max_sparsity=max_sparsity, min_per_row=min_per_row, reduction=reduction,
                max_batches=max_batches, unit=unit, max_states=max_states, fill=fill, reuse_prefix=reuse_prefix,
                max_batch_mb=max_batch_mb, show_progress=show_progress)
    if rounds == 1:
        return _allocate_once(model, sparsity, calib, names, masks, curves, info=info, **opts)
    if curves is not None:
        raise ValueError("rounds > 1 re-measures the curves on the pruned model every round; curves= cannot be given")
    return _allocate_rounds(model, sparsity, calib, names, masks, rounds, info=info, **opts)


def _allocate_once(model, sparsity, calib, names, masks, curves, *, grid, max_sparsity, min_per_row, reduction,
                   max_batches, unit, max_states, fill, reuse_prefix, max_batch_mb, show_progress, info):
    mods = dict(model.named_modules())
    if curves is None:
        curves = distortion_curves(model, calib, layers=names, masks=masks, grid=grid, max_sparsity=max_sparsity,
                                   min_per_row=min_per_row, reduction=reduction, max_batches=max_batches,
                                   reuse_prefix=reuse_prefix, max_batch_mb=max_batch_mb, show_progress=show_progress)
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
    floors = [_protected_count(mods[n].weight, masks[n] if masks is not None and n in masks else None, min_per_row)
              for n in names]  # the cap, also for curves measured elsewhere
    dp_info: dict = {}
    survivors = [[n - k for k in ks] for n, ks in zip(curves.sizes, curves.pruned)]
    picks, total = rd_dp(curves.distortion, survivors, budget, unit=unit, min_survivors=floors, info=dp_info)
    counts = _fill(curves, picks, target, lower) if fill else [curves.pruned[i][g] for i, g in enumerate(picks)]
    dp_seconds = time.perf_counter() - t0
    if info is not None:
        info.update(curve_seconds=curves.seconds, dp_seconds=dp_seconds, forwards=curves.forwards,
                    predicted_distortion=total, picks=picks, curves=curves, **dp_info)
    return {n: c / s for n, s, c in zip(curves.names, curves.sizes, counts)}


def _allocate_rounds(model, sparsity, calib, names, masks, rounds, *, info, min_per_row, **opts):
    mods = dict(model.named_modules())
    weights = {n: mods[n].weight for n in names}
    keep = {n: (masks[n].clone() if masks is not None and n in masks else torch.ones_like(w, dtype=torch.bool))
            for n, w in weights.items()}
    N = sum(w.numel() for w in weights.values())
    start = sum(int(k.numel() - int(k.sum())) for k in keep.values()) / max(N, 1)
    targets = geometric_targets(rounds, sparsity, initial=min(start, sparsity))
    saved = {n: w.detach().clone() for n, w in weights.items()}
    per_round = []
    try:
        for t, target in enumerate(targets):
            round_info: dict = {"target": target}
            alloc = _allocate_once(model, target, calib, names, keep, None, info=round_info, min_per_row=min_per_row,
                                   **opts)
            round_info["allocation"] = alloc
            per_round.append(round_info)
            if t == len(targets) - 1:
                break
            with torch.no_grad():
                for n, w in weights.items():
                    keep[n] = select_connected(w, alloc[n], keep=keep[n], min_per_row=min_per_row)
                    w.mul_(keep[n].to(w.dtype))
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(saved[n])
    if info is not None:
        info.update(rounds=per_round, targets=targets,
                    curve_seconds=sum(r["curve_seconds"] for r in per_round),
                    dp_seconds=sum(r["dp_seconds"] for r in per_round),
                    forwards=sum(r["forwards"] for r in per_round),
                    predicted_distortion=per_round[-1]["predicted_distortion"], curves=per_round[-1]["curves"])
    return alloc

