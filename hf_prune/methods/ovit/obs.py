"""oViT / CAP: correlation-aware second-order weight pruning (Kuznedelev et al., arXiv 2210.09223).

Steps (one-shot, :func:`ovit_prune`):

1. **Gradients**: ``m = num_grads`` mini-batch gradients of the cross-entropy loss, model in eval
   mode, gradients of already-masked weights zeroed (as in the paper code: one gradient per
   mini-batch, not per sample). A ``calib`` list or tuple is used once (repeating a fixed batch adds
   the same gradient again, which leaves the Fisher unchanged); a loader is re-iterated until ``m``
   gradients are collected. :func:`hf_prune.methods.ovit.recipe.calibration_batches` draws ``m``
   distinct mini-batches from a training set.
2. **Block-wise empirical Fisher inverse.** Each prunable weight tensor, flattened row-major, is cut
   into blocks of ``B = block_size`` consecutive weights (the last block of a layer may be
   shorter). Per block ``F = λI + (1/m) Σ_i g_i g_iᵀ`` (``λ = damping``) and ``F⁻¹`` is computed by
   **direct inversion** (Cholesky, then ``cholesky_inverse``) in ``dtype`` (float64 default,
   float32 allowed) — the same matrix as the paper code's ``m`` Sherman–Morrison updates from
   ``I/λ`` (tested), in one batched LAPACK call, and better conditioned at the paper's ``λ = 1e-8``.
3. **Correlation-aware removal** inside every block: repeatedly remove the weight ``q`` with the
   smallest ``ρ_q = w_q² / (2 [F⁻¹]_qq)``, update the others ``w ← w − F⁻¹[:, q] w_q / [F⁻¹]_qq``,
   downdate ``F⁻¹ ← F⁻¹ − F⁻¹[:, q] F⁻¹[q, :] / [F⁻¹]_qq`` (the inverse of ``F`` without ``q``), and
   record the accumulated loss ``Σ ρ`` after each removal. For a quadratic loss with Hessian ``F``
   the accumulated loss after ``k`` removals equals the true loss increase (tested).
4. **Global threshold.** The ``K = round(sparsity · N)`` smallest accumulated losses over all
   blocks of all layers are pruned. Accumulated losses never decrease inside a block, so this
   takes a prefix of every block's removal order: per-layer sparsity comes out non-uniform. Any
   other allocation (``allocation="uniform"`` / ``"erk"`` / ``{layer: sparsity}`` ...) instead
   thresholds each layer at its own count.
5. **N:M** (``nm=(2, 4)``): inside every block, remove greedily by ``ρ`` among the groups of ``M``
   consecutive weights (along the input dimension) that still have more than ``N``; every layer
   ends at exactly ``1 − N/M``.

Two ways to hold the Fisher information (``fisher=``), same ``F⁻¹`` up to round-off (tested):

* ``"gradients"``: keep the ``m × d`` gradient matrix (``grad_dtype``, fp32) and rebuild each
  chunk's blocks as ``GᵀG/m`` when needed. ``m·d`` floats: 360 GB for DeiT-S at ``m = 4096``.
* ``"blocks"`` (:class:`BlockFisher`, :func:`accumulate_fisher`): accumulate ``Σ g gᵀ`` per block on
  the fly; ``B/4`` gradients are buffered and added as one rank-k batched matrix product, so
  ``d·B`` values in ``dtype`` plus a ``(B/4)·d`` fp32 buffer, independent of ``m``.
* ``"auto"`` (default) picks the one with fewer bytes per weight: blocks when
  ``B·sizeof(dtype) < m·sizeof(grad_dtype)`` (fp64 blocks, fp32 gradients: when ``m > 2B``).
  Precomputed ``grads=`` use the gradient path.

**Memory bound** (``max_fisher_mb``): layers are packed, in model order, into groups whose Fisher
information (either form above) fits the budget, and processed one group at a time. The trade-off
is backward passes for memory: with the global threshold every group needs its Fisher twice (pass 1
and pass 2 below), so ``g`` groups cost ``2g`` rounds of ``m`` gradient passes instead of one
(``g`` rounds with a fixed allocation or N:M, whose counts are known after each layer's sweep). All
rounds see the original weights (the updated weights are written only at the end), so the result is
the same as without a budget — provided ``calib`` yields the same batches each time (a list; a
shuffling loader gives a different Fisher per round, a generator raises an error). A layer whose
Fisher alone exceeds the budget is an error naming the minimum budget; a shuffling ``DataLoader`` is
refused when there are several groups. ``max_fisher_mb="auto"`` (default, :func:`auto_fisher_mb`):
one group when all the Fisher information fits 4096 MiB, else groups of that size (or of the largest
layer, if larger), with a warning saying how many rounds of gradient passes that costs.

Other departures and memory:

* **Two passes.** The weights after ``k_b`` removals of block ``b`` depend on ``k_b``, known only
  after the global threshold; instead of keeping every block's ``F⁻¹`` (``d·B`` floats: ~16 GB
  fp32 for DeiT-S at ``B = 192``) next to ``F``, pass 1 records the removal order and accumulated
  losses, pass 2 rebuilds ``F⁻¹`` and replays the recorded order for ``k_b`` steps. Blocks are
  processed in chunks of at most ``chunk_bytes`` of ``F⁻¹`` (default 256 MiB). Peak memory ≈
  Fisher information of one group + order/losses (6 bytes per weight) + updated weights (one copy of
  the pruned layers) + one chunk (×~3 with temporaries).
* **Defaults.** ``block_size=128``, ``num_grads=256`` (paper code for ViTs: ``B = 192``, ``m = 4096``;
  earlier defaults here: 64 and 64), with the automatic Fisher budget above. ``m ≥ B`` keeps the Fisher
  blocks full rank, so ``λ`` no longer decides the scale of the directions no gradient saw; the removal
  loop costs ``O(d·B²)`` (4× the time of ``B = 64``) and ``m`` gradient passes cost time, not memory, on
  the block path. ``benchmarks/results/ovit_defaults.md`` measures accuracy and time on real digits for
  ``(B, m)`` = (64, 64), (128, 256), (192, 1024) and the Fisher memory and gradient rounds on DeiT-S,
  ViT-B, ResNet-50 and EfficientNet-Lite1.
* **Damping.** A block whose ``F + λI`` fails Cholesky (round-off on a rank-deficient Fisher, most
  often in float32 with ``m < B``) gets more damping, tenfold at a time and only for the failing
  blocks, with a warning naming the layer and the damping used; after 12 raises it is an error.
* The Fisher inversion and removal loops run on the **CPU** in ``dtype`` (the paper code works in
  fp32 on the GPU): weights are copied there chunk by chunk and the updated weights written back to
  the model's device. Gradients and Fisher blocks are stored on the CPU too.
* With ``loss_fn`` any ``loss_fn(logits, labels)`` replaces cross-entropy.
  :class:`~hf_prune.methods.ovit.callback.OViTCallback` computes the gradients on calibration data in eval
  mode at each pruning step (``fisher_source="calib"``, as in the paper;
  :func:`~hf_prune.methods.ovit.recipe.calibration_from_dataloader` draws ``m`` distinct mini-batches from the
  training set); ``fisher_source="training"`` keeps the last ``m`` training gradients (after
  clipping/averaging, model in train mode) as an ``m × d`` buffer — a departure from the paper.
* The gradual recipe (cubic schedule 40→75% with fine-tuning) is a schedule given to
  :class:`~hf_prune.methods.ovit.callback.OViTCallback`; the learning-rate restarts at every pruning step and
  the distillation from the dense model are in :mod:`hf_prune.methods.ovit.recipe`, for the training loop to use.
* Progress bars (:func:`hf_prune.core.progress.progress`) follow the gradient passes and the OBS sweeps.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...errors import PruningError
from ...core.execution import module_modes, restore_modes
from ...core.progress import progress
from ...sparse.masks import WeightMasks, forward_logits, iter_batches

logger = logging.getLogger(__name__)

__all__ = ["collect_gradients", "accumulate_fisher", "BlockFisher", "choose_fisher", "fisher_bytes", "plan_groups",
           "auto_fisher_mb", "obs_prune_layer", "ovit_prune", "FISHER_MODES", "DEFAULT_BLOCK_SIZE",
           "DEFAULT_NUM_GRADS", "DEFAULT_MAX_FISHER_MB"]

# Defaults (see "Defaults" in the module docstring): closer to the paper's B = 192, m = 4096 than a CPU
# needs, with the Fisher information bounded so that a default call does not exhaust a machine's memory.
DEFAULT_BLOCK_SIZE = 128
DEFAULT_NUM_GRADS = 256
DEFAULT_MAX_FISHER_MB = 4096


# ----------------------------------------------------------------------------------------- gradients


def _loss(logits: torch.Tensor, labels, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(logits, labels)
    if labels is None:
        raise PruningError("oViT needs labels in the calibration batches (for the cross-entropy gradients), "
                           "or a loss_fn(logits, labels) that works without them")
    return nn.functional.cross_entropy(logits, labels)


def _gradient_stream(model: nn.Module, calib, names: Sequence[str], num_grads: int, *,
                     masks: WeightMasks | None = None, loss_fn=None):
    """Yield, for up to ``num_grads`` calibration mini-batches, ``{layer: flat gradient or None}`` of
    the mean loss (model in eval mode, masked weights' gradients zeroed, ``None`` for a layer that
    took no part in the forward pass). Only the named weights require grad during the passes.
    A ``calib`` with fewer than ``num_grads`` batches is re-iterated unless it is a list or tuple
    (fixed batches: a repeat would add the same gradients again, which leaves the Fisher unchanged
    and only costs time). The tensors yielded are only valid until the next one is requested."""
    if num_grads < 1:
        raise ValueError(f"num_grads={num_grads} must be >= 1")
    mods = dict(model.named_modules())
    weights = {n: mods[n].weight for n in names}
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = module_modes(model)
    model.eval()
    count = 0
    passes = 1 if isinstance(calib, (list, tuple)) else num_grads
    bar = progress(total=num_grads, desc="oViT gradients")
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for _ in range(passes):  # passes over calib
            got = 0
            for inputs, labels in iter_batches(calib, None, device):
                for w in weights.values():
                    w.grad = None
                with torch.enable_grad():
                    _loss(forward_logits(model, inputs), labels, loss_fn).backward()
                out = {}
                for n, w in weights.items():
                    g = None if w.grad is None else w.grad.detach()
                    if g is not None and masks is not None and n in masks:
                        g = g * masks[n].to(g.dtype)
                    out[n] = None if g is None else g.reshape(-1)
                yield out
                count += 1
                got += 1
                bar.update(1)
                if count == num_grads:
                    break
            if count == num_grads or got == 0:
                break
    finally:
        bar.close()
        for p, f in flags.items():
            p.requires_grad_(f)
        for w in weights.values():
            w.grad = None
        restore_modes(modes)


def _check_count(count: int, num_grads: int) -> None:
    if count == 0:
        raise PruningError("calib yielded no batches")
    if count < num_grads:
        warnings.warn(f"calib gave only {count} mini-batch gradients of the num_grads={num_grads} asked for; "
                      f"using {count} (pass more calibration batches, or a loader that yields new ones each "
                      "pass, for a better Fisher estimate)", stacklevel=4)


def collect_gradients(model: nn.Module, calib, names: Sequence[str], num_grads: int, *,
                      masks: WeightMasks | None = None, loss_fn=None,
                      grad_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{layer: G}`` with ``G`` of shape ``(m, numel)`` on the CPU: one gradient of the mean loss per
    calibration mini-batch (model in eval mode; masked weights' gradients zeroed). ``calib`` is
    re-iterated if it has fewer than ``num_grads`` batches; if it cannot be (a generator), fewer
    gradients are used, with a warning."""
    mods = dict(model.named_modules())
    grads = {n: torch.zeros((num_grads, mods[n].weight.numel()), dtype=grad_dtype) for n in names}
    count = 0
    for step in _gradient_stream(model, calib, names, num_grads, masks=masks, loss_fn=loss_fn):
        for n, g in step.items():
            if g is not None:
                grads[n][count].copy_(g)
        count += 1
    _check_count(count, num_grads)
    return grads if count == num_grads else {n: g[:count].contiguous() for n, g in grads.items()}


# ----------------------------------------------------------------------------------------- Fisher blocks


def _segments(d: int, block_size: int) -> list[tuple[int, int, int]]:
    """A flat tensor of ``d`` weights cut into blocks: ``[(start, block size, number of blocks)]``
    (one segment of full blocks, then the shorter last block if any)."""
    B = min(block_size, d)
    nb = d // B
    out = [(0, B, nb)] if nb else []
    if d - nb * B:
        out.append((nb * B, d - nb * B, 1))
    return out


_MAX_DAMPING_STEPS = 12  # tenfold raises of the damping of a failing block before giving up


def _damped_inverse(F: torch.Tensor, damping: float, *, name: str = "", warn: bool = True) -> torch.Tensor:
    """``(F + λI)⁻¹`` for a batch of symmetric PSD blocks (nb, B, B), in place on ``F``'s storage:
    Cholesky then ``cholesky_inverse``. Round-off can make a rank-deficient ``F + λI`` with the
    paper's tiny ``λ`` fail Cholesky. Only the failing blocks then get more damping, tenfold at a time
    (from ``max(10λ, 1e-10 × their mean diagonal)``), with a warning naming the layer ``name`` and
    the damping used; after 12 raises it is an error."""
    diag = F.diagonal(dim1=1, dim2=2)
    diag.add_(damping)
    L, info = torch.linalg.cholesky_ex(F)
    bad = (info != 0).nonzero().flatten()
    if bad.numel() == 0:
        return torch.cholesky_inverse(L)
    scale = diag[bad].mean(dim=1).abs()
    extra = torch.clamp_min(scale * 1e-10, 10 * damping)
    added = torch.zeros_like(extra)
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    for _ in range(_MAX_DAMPING_STEPS):
        F[bad] += (extra - added).to(F.dtype)[:, None, None] * eye
        added = extra.clone()
        Lb, info_b = torch.linalg.cholesky_ex(F[bad])
        ok = info_b == 0
        L[bad[ok]] = Lb[ok]
        if bool(ok.all()):
            break
        extra = torch.where(ok, extra, extra * 10)
    else:
        raise PruningError(f"the empirical Fisher of layer {name!r} is not positive definite in {int(bad.numel())} "
                           f"block(s) even with damping {float(damping + extra.max()):.3g}; raise damping= or "
                           "num_grads=, or use dtype=torch.float64")
    if warn:
        warnings.warn(f"oViT: the empirical Fisher of layer {name!r} failed Cholesky at damping={damping:g} in "
                      f"{int(bad.numel())} of {F.shape[0]} block(s) (round-off on a rank-deficient Fisher); damping "
                      f"was raised to {float(damping + extra.max()):.3g} there. Raise num_grads= (at least "
                      f"block_size={F.shape[-1]} gradients give a full-rank Fisher) or damping=, or use "
                      "dtype=torch.float64", stacklevel=2)
    return torch.cholesky_inverse(L)


class BlockFisher:
    """The running sum ``Σ_i g_i g_iᵀ`` of one layer's gradients, for every block of ``block_size``
    consecutive weights (row-major): ``d·B`` numbers whatever the number of gradients ``m``.

    :meth:`add` takes a ``(k, numel)`` batch of gradients and does one rank-``k`` update per block
    (a batched matrix product: ``k`` times fewer sweeps over the ``d·B`` memory than ``k`` rank-1
    updates). :meth:`inverse` returns ``(Σ g gᵀ / m + λI)⁻¹`` for a range of blocks — the same
    matrix as the paper code's ``m`` Sherman–Morrison updates starting from ``I/λ``.
    """

    def __init__(self, numel: int, block_size: int, dtype: torch.dtype = torch.float64):
        self.segments = _segments(int(numel), int(block_size))
        self.sums = [torch.zeros((nb, bs, bs), dtype=dtype) for _, bs, nb in self.segments]
        self.count = 0
        self.seconds = 0.0  # time spent in add(), for cost reports

    @staticmethod
    def nbytes_for(numel: int, block_size: int, dtype: torch.dtype) -> int:
        return sum(nb * bs * bs for _, bs, nb in _segments(numel, block_size)) * (torch.finfo(dtype).bits // 8)

    @torch.no_grad()
    def add(self, G: torch.Tensor) -> None:
        """Accumulate the rows of ``G`` (k, numel)."""
        t0 = time.perf_counter()
        k = G.shape[0]
        for (start, bs, nb), S in zip(self.segments, self.sums):
            Gs = G[:, start:start + nb * bs].to("cpu", S.dtype).reshape(k, nb, bs).transpose(0, 1)  # (nb, k, bs)
            S.baddbmm_(Gs.transpose(1, 2), Gs)
        self.count += k
        self.seconds += time.perf_counter() - t0

    def inverse(self, si: int, b0: int, b1: int, damping: float, *, name: str = "", warn: bool = True) -> torch.Tensor:
        """``F⁻¹`` of blocks ``b0:b1`` of segment ``si`` (a new tensor); ``name`` names the layer in
        the warning when damping must be raised."""
        if self.count == 0:
            raise PruningError("BlockFisher.inverse: no gradients were added")
        return _damped_inverse(self.sums[si][b0:b1] / self.count, damping, name=name, warn=warn)


class _GradientFisher:
    """The same interface as :class:`BlockFisher` over a kept ``(m, numel)`` gradient matrix: each
    range of blocks' Fisher is rebuilt as ``GᵀG / m`` when it is needed."""

    def __init__(self, G: torch.Tensor, block_size: int, dtype: torch.dtype):
        self.G, self.dtype = G, dtype
        self.segments = _segments(G.shape[1], block_size)

    def inverse(self, si: int, b0: int, b1: int, damping: float, *, name: str = "", warn: bool = True) -> torch.Tensor:
        start, bs, _ = self.segments[si]
        m = self.G.shape[0]
        Gc = self.G[:, start + b0 * bs:start + b1 * bs].to(self.dtype).reshape(m, b1 - b0, bs).transpose(0, 1)
        return _damped_inverse(torch.bmm(Gc.transpose(1, 2), Gc).div_(m), damping, name=name, warn=warn)


def _buffer_rows(block_size: int, num_grads: int) -> int:
    """Gradients buffered before one rank-k Fisher update: B/4 (at least 1, at most m) keeps the
    buffer at a quarter of the Fisher blocks' size in fp32 while making the update a matrix product."""
    return max(1, min(num_grads, block_size // 4))


def accumulate_fisher(model: nn.Module, calib, names: Sequence[str], num_grads: int, *, block_size: int,
                      masks: WeightMasks | None = None, loss_fn=None, dtype: torch.dtype = torch.float64,
                      grad_dtype: torch.dtype = torch.float32, grads: Mapping[str, torch.Tensor] | None = None,
                      buffer_rows: int | None = None) -> dict[str, BlockFisher]:
    """``{layer: BlockFisher}`` accumulated on the fly from ``num_grads`` mini-batch gradients (the
    same gradients as :func:`collect_gradients`, never all kept): ``buffer_rows`` of them (default
    :func:`_buffer_rows`) are buffered in ``grad_dtype`` and added as one rank-k update. With
    ``grads`` (``{layer: (m, numel)}``) those rows are accumulated instead of running the model."""
    mods = dict(model.named_modules())
    numel = {n: mods[n].weight.numel() for n in names}
    fishers = {n: BlockFisher(numel[n], block_size, dtype) for n in names}
    k = buffer_rows or _buffer_rows(block_size, num_grads)
    if grads is not None:
        for n in names:
            for i in range(0, grads[n].shape[0], k):
                fishers[n].add(grads[n][i:i + k])
        return fishers
    buf = {n: torch.zeros((k, numel[n]), dtype=grad_dtype) for n in names}
    fill = count = 0

    def flush():
        for n in names:
            fishers[n].add(buf[n][:fill])

    for step in _gradient_stream(model, calib, names, num_grads, masks=masks, loss_fn=loss_fn):
        for n, g in step.items():
            if g is None:
                buf[n][fill].zero_()
            else:
                buf[n][fill].copy_(g)
        fill += 1
        count += 1
        if fill == k:
            flush()
            fill = 0
    if fill:
        flush()
    _check_count(count, num_grads)
    return fishers


# ----------------------------------------------------------------------------------------- OBS core


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` intra-op threads (None: leave torch's setting). The removal loop is thousands
    of memory-bound steps; on a busy machine one thread can be several times faster than two."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _remove_step(W, Finv, diag, removed, q, active) -> None:
    """Remove weight ``q`` of every active block: OBS update of ``W``, downdate of ``F⁻¹`` and of its
    diagonal ``diag``, mark it in ``removed``.

    ``F⁻¹`` is symmetric, so its (contiguous) row ``q`` is used for the column. Round-off leaves
    ~1e-18 in the removed rows/columns of the downdated inverse; they only ever touch removed
    coordinates, whose weights are re-zeroed after every step.
    """
    nb = W.shape[0]
    ar = torch.arange(nb)
    row = Finv[ar, q, :]  # (nb, B)
    fqq = row[ar, q].clamp_min(1e-300)
    scale = torch.where(active, 1.0 / fqq, torch.zeros_like(fqq))
    u = row * scale.unsqueeze(1)
    W.sub_(u * W[ar, q].unsqueeze(1))
    Finv.addcmul_(u.unsqueeze(2), row.unsqueeze(1), value=-1.0)
    diag.sub_(u * row)
    removed[ar[active], q[active]] = True
    W.masked_fill_(removed, 0.0)


def _sweep(W, Finv, steps: int, prior: torch.Tensor | None, nm) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 on one chunk: greedy OBS removal for ``steps`` steps. Returns accumulated losses
    (nb, steps) float32 (``-1`` for forced removals of already-masked weights, ``inf`` where nothing
    was removable) and the removal order (nb, steps) int16/int32 (``-1`` for no-ops)."""
    nb, B = W.shape
    ar = torch.arange(nb)
    removed = torch.zeros((nb, B), dtype=torch.bool)
    forced = ~prior if prior is not None else None
    diag = Finv.diagonal(dim1=1, dim2=2).clone()
    acc = torch.zeros(nb, dtype=torch.float64)
    accs = torch.empty((nb, steps), dtype=torch.float32)
    order = torch.empty((nb, steps), dtype=torch.int16 if B < 2 ** 15 else torch.int32)
    if nm is not None:
        n_, m_ = nm
        gcount = torch.zeros((nb, B // m_), dtype=torch.int64)
    for t in range(steps):
        rho = W.square() / (2.0 * diag.clamp_min(1e-300))
        blocked = removed
        if nm is not None:
            blocked = blocked | (gcount >= m_ - n_).repeat_interleave(m_, dim=1)
        score = rho.masked_fill(blocked, math.inf)
        if forced is not None:
            score = score.masked_fill(forced & ~removed, -math.inf)
        q = score.argmin(dim=1)
        s = score[ar, q]
        active = s < math.inf
        is_forced = s == -math.inf
        real = rho[ar, q]  # true ρ, also for forced removals (0 when the weight is already 0)
        acc += torch.where(active, real, torch.zeros_like(real))
        accs[:, t] = torch.where(is_forced, torch.full_like(acc, -1.0),
                                 torch.where(active, acc, torch.full_like(acc, math.inf))).float()
        order[:, t] = torch.where(active, q, torch.full_like(q, -1)).to(order.dtype)
        _remove_step(W, Finv, diag, removed, q, active)
        if nm is not None:
            gcount[ar[active], (q // m_)[active]] += 1
    return accs, order


def _replay(W, Finv, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pass 2 on one chunk: apply the first ``counts[b]`` recorded removals of each block.
    Returns the keep-mask (nb, B)."""
    nb, B = W.shape
    removed = torch.zeros((nb, B), dtype=torch.bool)
    diag = Finv.diagonal(dim1=1, dim2=2).clone()
    T = int(counts.max()) if counts.numel() else 0
    for t in range(T):
        q = order[:, t].long()
        active = (t < counts) & (q >= 0)
        _remove_step(W, Finv, diag, removed, q.clamp_min(0), active)
    return ~removed


class _LayerOBS:
    """Pass 1 and pass 2 for one layer, chunk by chunk (see module docstring). ``fisher`` (a
    :class:`BlockFisher` or :class:`_GradientFisher`) is set by the driver before each pass and
    dropped after it, so that only one group of layers holds Fisher information at a time."""

    def __init__(self, name: str, weight: torch.Tensor, keep: torch.Tensor | None, *,
                 block_size: int, damping: float, nm, dtype: torch.dtype, chunk_bytes: int):
        self.name, self.weight = name, weight
        self.keep = keep.reshape(-1).cpu() if keep is not None else None
        self.damping, self.nm, self.dtype = float(damping), nm, dtype
        self.d = d = weight.numel()
        self.block_size = B = min(block_size, d)
        if nm is not None:
            n_, m_ = nm
            cols = weight[0].numel() if weight.dim() > 1 else d
            if cols % m_ or B % m_:
                raise PruningError(f"{n_}:{m_} sparsity on {name!r} needs its input dimension ({cols}) and "
                                   f"block_size ({B}) to be multiples of {m_}; exclude the layer or change "
                                   "block_size")
        self.segments = _segments(d, B)
        itemsize = torch.finfo(dtype).bits // 8
        self.chunk_blocks = [max(1, int(chunk_bytes // (bs * bs * itemsize))) for _, bs, _ in self.segments]
        self.fisher = None
        self.acc: list[torch.Tensor] = []
        self.order: list[torch.Tensor] = []
        self.updates: list[tuple[int, int, torch.Tensor]] = []

    def steps(self, bs: int) -> int:
        if self.nm is None:
            return bs
        n_, m_ = self.nm
        return bs * (m_ - n_) // m_

    def _chunks(self):
        flat = self.weight.detach().reshape(-1)
        for si, ((start, bs, nb), cb) in enumerate(zip(self.segments, self.chunk_blocks)):
            for b0 in range(0, nb, cb):
                b1 = min(nb, b0 + cb)
                lo, hi = start + b0 * bs, start + b1 * bs
                W = flat[lo:hi].to("cpu", self.dtype).reshape(b1 - b0, bs).clone()
                prior = self.keep[lo:hi].reshape(b1 - b0, bs) if self.keep is not None else None
                yield si, b0, b1, lo, hi, W, prior

    def sweep(self) -> None:
        self.acc = [torch.empty((nb, self.steps(bs)), dtype=torch.float32) for _, bs, nb in self.segments]
        self.order = [torch.empty((nb, self.steps(bs)), dtype=torch.int16 if bs < 2 ** 15 else torch.int32)
                      for _, bs, nb in self.segments]
        for si, b0, b1, lo, hi, W, prior in self._chunks():
            Finv = self.fisher.inverse(si, b0, b1, self.damping, name=self.name)
            a, o = _sweep(W, Finv, self.acc[si].shape[1], prior, self.nm)
            self.acc[si][b0:b1] = a
            self.order[si][b0:b1] = o
            del Finv

    def prior_pruned(self) -> int:
        return 0 if self.keep is None else int(self.keep.numel() - int(self.keep.sum()))

    @torch.no_grad()
    def apply(self, counts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Replay the first ``counts`` removals of every block; the updated weights are kept in
        ``self.updates`` (CPU, the weight's dtype) until :meth:`write`, so that gradient passes of
        later layer groups still see the original model. Returns (keep-mask, predicted loss)."""
        keep = torch.ones(self.d, dtype=torch.bool)
        loss = 0.0
        self.updates = []
        for si, b0, b1, lo, hi, W, prior in self._chunks():
            c = counts[si][b0:b1]
            if not bool((c > 0).any()):
                continue
            Finv = self.fisher.inverse(si, b0, b1, self.damping, name=self.name, warn=False)  # pass 1 warned
            keep[lo:hi] = _replay(W, Finv, self.order[si][b0:b1], c).reshape(-1)
            self.updates.append((lo, hi, W.reshape(-1).to(self.weight.dtype)))
            a = self.acc[si][b0:b1]
            last = a.gather(1, (c - 1).clamp_min(0).unsqueeze(1).long()).squeeze(1)
            loss += float(torch.where((c > 0) & (last >= 0) & torch.isfinite(last), last.double(),
                                      torch.zeros_like(last, dtype=torch.float64)).sum())
        return keep.reshape(self.weight.shape), loss

    @torch.no_grad()
    def write(self) -> None:
        """Write the updated weights into the layer."""
        contiguous = self.weight.is_contiguous()
        flat = self.weight.data.view(-1) if contiguous else self.weight.data.flatten()  # copy if strided
        for lo, hi, w in self.updates:
            flat[lo:hi] = w.to(flat.device)
        if not contiguous:
            self.weight.data.copy_(flat.view(self.weight.shape))
        self.updates = []


def _counts_below(accs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per-block counts of the ``k`` smallest accumulated losses (prefixes of each block's order)."""
    if k <= 0:
        return [torch.zeros(a.shape[0], dtype=torch.long) for a in accs]
    flat = torch.cat([a.reshape(-1) for a in accs])
    finite = int(torch.isfinite(flat).sum())
    if k > finite:
        raise PruningError(f"cannot prune {k} weights: only {finite} are removable")
    tau = torch.kthvalue(flat, k).values
    below = [(a < tau).sum(1) for a in accs]
    ties = [(a == tau).sum(1) for a in accs]
    rest = k - sum(int(b.sum()) for b in below)
    out = []
    for b, t in zip(below, ties):
        before = torch.cumsum(t, 0) - t
        take = (rest - before).clamp(min=0)
        take = torch.minimum(take, t)
        rest -= int(take.sum())
        out.append(b + take)
    return out


def obs_prune_layer(weight: torch.Tensor, grads: torch.Tensor, sparsity: float, *, block_size: int = DEFAULT_BLOCK_SIZE,
                    damping: float = 1e-8, nm: tuple[int, int] | None = None, keep: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64, chunk_bytes: int = 256 << 20, inplace: bool = False,
                    num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """OBS selection inside one layer at a given sparsity (the selection half of oViT).

    ``weight``: the tensor; ``grads``: (m, weight.numel()) gradients defining the empirical Fisher.
    Returns ``(new weight, keep-mask, predicted loss increase)``; the weight is changed in place
    only with ``inplace=True``. ``nm`` ignores ``sparsity`` (exactly ``1 − N/M``).
    """
    w = weight if inplace else weight.detach().clone()
    lay = _LayerOBS("layer", w, keep, block_size=block_size, damping=damping, nm=nm, dtype=dtype,
                    chunk_bytes=chunk_bytes)
    lay.fisher = _GradientFisher(grads, lay.block_size, dtype)
    with _threads(num_threads):
        lay.sweep()
        if nm is not None:
            counts = [torch.full((a.shape[0],), a.shape[1], dtype=torch.long) for a in lay.acc]
        else:
            k = max(int(round(float(sparsity) * lay.d)), lay.prior_pruned())
            counts = _counts_below(lay.acc, k)
        new_keep, loss = lay.apply(counts)
        lay.write()
    return w, new_keep, loss


# ----------------------------------------------------------------------------------------- one-shot

FISHER_MODES = ("auto", "gradients", "blocks")


def choose_fisher(fisher: str, num_grads: int, block_size: int, dtype: torch.dtype, grad_dtype: torch.dtype,
                  have_grads: bool = False) -> str:
    """Resolve ``fisher="auto"``: the representation that stores fewer bytes per weight —
    ``"gradients"`` (``m`` values in ``grad_dtype``) or ``"blocks"`` (``B`` values in ``dtype``);
    ties and precomputed gradients go to ``"gradients"`` (nothing to accumulate)."""
    if fisher not in FISHER_MODES:
        raise ValueError(f"fisher={fisher!r} must be one of {', '.join(map(repr, FISHER_MODES))}")
    if fisher != "auto":
        return fisher
    if have_grads:
        return "gradients"
    per_weight_blocks = block_size * (torch.finfo(dtype).bits // 8)
    per_weight_grads = num_grads * (torch.finfo(grad_dtype).bits // 8)
    return "blocks" if per_weight_blocks < per_weight_grads else "gradients"


def fisher_bytes(numel: int, *, fisher: str, block_size: int, num_grads: int, dtype: torch.dtype,
                 grad_dtype: torch.dtype) -> int:
    """Bytes of Fisher information one layer holds while it is processed: the ``m × numel``
    gradient matrix, or its Fisher blocks plus the rank-k accumulation buffer."""
    gi = torch.finfo(grad_dtype).bits // 8
    if fisher == "gradients":
        return num_grads * numel * gi
    return BlockFisher.nbytes_for(numel, block_size, dtype) + _buffer_rows(block_size, num_grads) * numel * gi


def auto_fisher_mb(sizes: Mapping[str, int]) -> float | None:
    """The default Fisher budget for layers holding ``sizes`` bytes of Fisher information: ``None``
    (one group, one round of gradient passes) when all of it fits :data:`DEFAULT_MAX_FISHER_MB`, else
    that budget — or the largest single layer's Fisher when that alone is larger (a layer cannot be
    split across groups)."""
    total, largest = sum(sizes.values()), max(sizes.values(), default=0)
    budget = DEFAULT_MAX_FISHER_MB * 2 ** 20
    if total <= budget:
        return None
    return max(budget, math.ceil(largest / 2 ** 20 * 10) / 10 * 2 ** 20) / 2 ** 20


def plan_groups(sizes: Mapping[str, int], max_mb: float | None) -> list[list[str]]:
    """Consecutive layers packed into groups whose Fisher bytes ``sizes`` fit ``max_mb`` MiB (None:
    one group)."""
    if max_mb is None:
        return [list(sizes)]
    budget = max_mb * 2 ** 20
    groups: list[list[str]] = [[]]
    used = 0
    for n, b in sizes.items():
        if b > budget:
            need = math.ceil(b / 2 ** 20 * 10) / 10
            raise PruningError(f"max_fisher_mb={max_mb:g} is below the Fisher information of layer {n!r} alone "
                               f"({b / 2 ** 20:.2f} MiB); raise max_fisher_mb to at least {need:g}, or lower "
                               "block_size / num_grads")
        if groups[-1] and used + b > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += b
    return groups


class _FisherSource:
    """Builds the Fisher information of a group of layers: from precomputed ``grads`` or by one
    round of gradient passes over ``calib``. Every round must see the same number of gradients
    (each round re-iterates ``calib``; a generator cannot be)."""

    def __init__(self, model, calib, *, fisher, grads, num_grads, block_size, masks, loss_fn, dtype, grad_dtype):
        self.model, self.calib, self.fisher, self.grads = model, calib, fisher, grads
        self.num_grads, self.block_size, self.masks, self.loss_fn = num_grads, block_size, masks, loss_fn
        self.dtype, self.grad_dtype = dtype, grad_dtype
        self.rounds, self.seconds, self.count = 0, 0.0, None
        self.accumulate_seconds = 0.0

    def build(self, layers: list[_LayerOBS]) -> None:
        t0 = time.perf_counter()
        names = [lay.name for lay in layers]
        try:
            count = self._attach(layers, names)
        except PruningError as exc:
            if self.count is None:
                raise
            raise PruningError(f"{self._repeat_hint}; this round failed: {exc}") from exc
        if self.count is not None and count != self.count:
            raise PruningError(f"{self._repeat_hint}; calib gave {count} gradients in a later round but "
                               f"{self.count} in the first")
        self.count = count
        self.rounds += self.grads is None
        self.seconds += time.perf_counter() - t0

    _repeat_hint = ("with max_fisher_mb the gradient passes are repeated per group of layers, so calib must be "
                    "re-iterable and deterministic (a list of batches, no shuffling)")

    def _attach(self, layers: list[_LayerOBS], names: list[str]) -> int:
        """Build the group's Fisher, attach it to its layers, return the number of gradients."""
        if self.fisher == "gradients":
            G = self.grads if self.grads is not None else collect_gradients(
                self.model, self.calib, names, self.num_grads, masks=self.masks, loss_fn=self.loss_fn,
                grad_dtype=self.grad_dtype)
            for lay in layers:
                lay.fisher = _GradientFisher(G[lay.name], lay.block_size, self.dtype)
            return int(G[names[0]].shape[0])
        F = accumulate_fisher(self.model, self.calib, names, self.num_grads, block_size=self.block_size,
                              masks=self.masks, loss_fn=self.loss_fn, dtype=self.dtype, grad_dtype=self.grad_dtype,
                              grads=self.grads)
        for lay in layers:
            lay.fisher = F[lay.name]
        self.accumulate_seconds += sum(f.seconds for f in F.values())
        return F[names[0]].count

    @staticmethod
    def drop(layers: list[_LayerOBS]) -> None:
        for lay in layers:
            lay.fisher = None


def _fixed_counts(layers: list[_LayerOBS], targets: Mapping[str, float] | None) -> dict[str, list[torch.Tensor]]:
    """Per-block counts when every layer's sparsity is known before the sweep (N:M: the whole order;
    otherwise the layer's ``round(target · d)`` smallest losses)."""
    out = {}
    for lay in layers:
        if targets is None:
            out[lay.name] = [torch.full((a.shape[0],), a.shape[1], dtype=torch.long) for a in lay.acc]
        else:
            k = max(int(round(targets.get(lay.name, 0.0) * lay.d)), lay.prior_pruned())
            out[lay.name] = _counts_below(lay.acc, k)
    return out


def _global_counts(layers: list[_LayerOBS], sparsity: float) -> dict[str, list[torch.Tensor]]:
    """The paper's global threshold: the ``round(sparsity · N)`` smallest accumulated losses over all
    blocks of all layers."""
    N = sum(lay.d for lay in layers)
    k = max(int(round(sparsity * N)), sum(lay.prior_pruned() for lay in layers))
    flat = _counts_below([a for lay in layers for a in lay.acc], k)
    counts, i = {}, 0
    for lay in layers:
        counts[lay.name] = flat[i:i + len(lay.acc)]
        i += len(lay.acc)
    return counts


def ovit_prune(model: nn.Module, sparsity: float, calib, *, block_size: int = DEFAULT_BLOCK_SIZE,
               num_grads: int = DEFAULT_NUM_GRADS, damping: float = 1e-8, nm: tuple[int, int] | None = None,
               allocation=None, masks: WeightMasks | None = None, grads: Mapping[str, torch.Tensor] | None = None,
               loss_fn=None, dtype: torch.dtype = torch.float64, grad_dtype: torch.dtype = torch.float32,
               fisher: str = "auto", max_fisher_mb: float | str | None = "auto", chunk_bytes: int = 256 << 20,
               num_threads: int | None = None, info: dict | None = None, layers: Sequence[str] | None = None,
               exchange=None, **layer_opts) -> dict:
    """One-shot oViT pruning of ``model`` in place to ``sparsity`` (fraction of the prunable weights).

    ``block_size`` (B), ``num_grads`` (m), ``damping`` (λ): see the module docstring. ``nm=(2, 4)``
    for N:M. ``allocation=None`` is the paper's global threshold on the OBS losses; a name of
    :data:`~hf_prune.sparse.allocation.ALLOCATORS` or ``{layer: sparsity}`` fixes per-layer
    sparsities instead (OBS still chooses and updates weights inside each layer). ``grads``: precomputed
    ``{layer: (m, numel)}`` gradients (skips the gradient passes). ``fisher``: ``"gradients"`` (keep the
    ``m × d`` gradients), ``"blocks"`` (accumulate ``d × B`` Fisher blocks on the fly) or ``"auto"``
    (the smaller; :func:`choose_fisher`). ``max_fisher_mb``: at most this much Fisher information is
    held at once; layers are processed in groups that fit, at the cost of repeating the gradient
    passes per group (see the module docstring); ``"auto"`` (default): :func:`auto_fisher_mb`,
    ``None``: no bound. ``info`` receives timings and sizes. ``masks``: the
    :class:`~hf_prune.sparse.masks.WeightMasks` to grow (:func:`hf_prune.prune` with ``method="ovit"``
    finds the layers and makes it transactional).

    Layer partitioning (distributed calibration, :mod:`hf_prune.sparse.distributed`): ``layers`` is the
    subset of ``masks.layers`` this call computes gradients, Fisher and removals for (default: all); the
    others are left as they are. With the global threshold, ``exchange({layer: accumulated losses})``
    must fill in, in place, the losses of the layers not in ``layers`` (computed elsewhere) before the
    threshold is taken over all of them.
    """
    if masks is None:
        raise TypeError("ovit_prune needs the WeightMasks to grow (masks=); to prune a model call "
                        "hf_prune.prune(model, 'ovit', sparsity=..., calib=...)")
    if layer_opts:
        raise TypeError(f"unexpected options {sorted(layer_opts)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if damping <= 0:
        raise ValueError(f"damping={damping} must be > 0")
    if max_fisher_mb != "auto" and max_fisher_mb is not None and not (
            isinstance(max_fisher_mb, (int, float)) and max_fisher_mb > 0):
        raise ValueError(f"max_fisher_mb={max_fisher_mb!r} must be > 0 (MiB), 'auto' or None for no limit")
    names = masks.layers if layers is None else [n for n in masks.layers if n in set(layers)]
    if grads is not None:
        num_grads = int(next(iter(grads.values())).shape[0])
    mode = choose_fisher(fisher, num_grads, block_size, dtype, grad_dtype, have_grads=grads is not None)
    layers = [_LayerOBS(n, masks.weight(n), masks[n], block_size=block_size, damping=damping, nm=nm,
                        dtype=dtype, chunk_bytes=chunk_bytes) for n in names]
    by_name = {lay.name: lay for lay in layers}
    others = [_LayerOBS(n, masks.weight(n), masks[n], block_size=block_size, damping=damping, nm=nm, dtype=dtype,
                        chunk_bytes=chunk_bytes) for n in masks.layers if n not in by_name]
    # precomputed gradient matrices are already in memory: nothing to bound
    sizes = {lay.name: 0 if (grads is not None and mode == "gradients") else
             fisher_bytes(lay.d, fisher=mode, block_size=lay.block_size, num_grads=num_grads, dtype=dtype,
                          grad_dtype=grad_dtype) for lay in layers}
    auto = max_fisher_mb == "auto"
    if auto:
        max_fisher_mb = auto_fisher_mb(sizes)
    groups = [g for g in plan_groups(sizes, max_fisher_mb) if g]  # none when this process owns no layer
    if auto and len(groups) > 1:
        rounds = len(groups) * (1 if nm is not None or allocation is not None else 2)
        warnings.warn(f"oViT: the Fisher information of the {len(names)} layers needs "
                      f"{sum(sizes.values()) / 2 ** 30:.1f} GiB (block_size={block_size}, num_grads={num_grads}); the "
                      f"default budget max_fisher_mb='auto' ({max_fisher_mb:.0f} MiB) processes them in {len(groups)} "
                      f"groups, i.e. {rounds} rounds of gradient passes instead of 1. Pass max_fisher_mb= (MiB) to "
                      "choose, or lower block_size / num_grads", stacklevel=3)
    if len(groups) > 1 and grads is None:
        _check_repeatable(calib)
    source = _FisherSource(model, calib, fisher=mode, grads=grads, num_grads=num_grads, block_size=block_size,
                           masks=masks, loss_fn=loss_fn, dtype=dtype, grad_dtype=grad_dtype)
    if nm is not None:
        alloc_name, targets = f"{nm[0]}:{nm[1]}", None
    elif allocation is None:
        alloc_name, targets = "ovit-global", None
    elif isinstance(allocation, Mapping):
        alloc_name, targets = "explicit", dict(allocation)
    else:
        from ...sparse.allocation import allocate

        alloc_name = allocation
        targets = allocate(allocation, {n: masks.weight(n) for n in masks.layers}, sparsity, keep=masks.masks)
    one_round = alloc_name != "ovit-global"  # counts known right after each layer's sweep
    t_sweep = t_apply = 0.0
    predicted = 0.0
    counts: dict[str, list[torch.Tensor]] = {}
    bar = progress(total=2 * len(layers), desc="oViT OBS sweeps")  # one sweep and one replay per layer
    with _threads(num_threads), _closing(bar):
        for group in groups:  # pass 1 (and pass 2 when the counts do not need the other groups)
            glayers = [by_name[n] for n in group]
            source.build(glayers)
            t1 = time.perf_counter()
            for lay in glayers:
                lay.sweep()
                bar.update(1)
            t_sweep += time.perf_counter() - t1
            if one_round:
                counts.update(_fixed_counts(glayers, targets))
                t2 = time.perf_counter()
                predicted += _apply_group(glayers, counts, masks, bar)
                t_apply += time.perf_counter() - t2
            if len(groups) > 1 or one_round:
                source.drop(glayers)
        if not one_round:
            everyone = {**by_name, **{lay.name: lay for lay in others}}
            if others and exchange is None:
                raise TypeError("ovit_prune(layers=...) with the global threshold needs exchange= to get the "
                                "accumulated losses of the other layers")
            if exchange is not None:  # the other layers' losses come from the processes that swept them
                for lay in others:
                    lay.acc = [torch.empty((nb, lay.steps(bs)), dtype=torch.float32) for _, bs, nb in lay.segments]
                exchange({n: everyone[n].acc for n in masks.layers})
            counts = _global_counts([everyone[n] for n in masks.layers], sparsity)
            for group in groups:  # pass 2: the Fisher of each group again (rebuilt only with several groups)
                glayers = [by_name[n] for n in group]
                if glayers[0].fisher is None:
                    source.build(glayers)
                t2 = time.perf_counter()
                predicted += _apply_group(glayers, counts, masks, bar)
                t_apply += time.perf_counter() - t2
                source.drop(glayers)
    for lay in layers:  # only now: every gradient pass above saw the original weights
        lay.write()
    masks.enforce()
    if info is not None:
        info.update(grad_seconds=source.seconds, accumulate_seconds=source.accumulate_seconds,
                    sweep_seconds=t_sweep, apply_seconds=t_apply, num_grads=int(source.count or 0),
                    predicted_loss=predicted, fisher=mode, groups=len(groups), max_fisher_mb=max_fisher_mb,
                    gradient_rounds=source.rounds, fisher_bytes=int(sum(sizes.values())),
                    max_group_fisher_bytes=int(max((sum(sizes[n] for n in g) for g in groups), default=0)),
                    grad_bytes=int(sum(g.numel() * g.element_size() for g in grads.values())) if grads is not None
                    else (int(sum(sizes.values())) if mode == "gradients" else 0))
    return {"allocation": alloc_name, "predicted_loss": predicted}


def _apply_group(layers: list[_LayerOBS], counts, masks: WeightMasks, bar=None) -> float:
    """Pass 2 for a group: replay, record the new masks (weights are written at the very end)."""
    loss = 0.0
    for lay in layers:
        keep, lay_loss = lay.apply(counts[lay.name])
        masks.set(lay.name, keep)
        loss += lay_loss
        if bar is not None:
            bar.update(1)
    return loss


@contextlib.contextmanager
def _closing(bar):
    try:
        yield bar
    finally:
        bar.close()


def _check_repeatable(calib) -> None:
    """Several layer groups repeat the gradient passes: each must see the same batches."""
    sampler = getattr(calib, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise PruningError("max_fisher_mb splits the layers into groups, each with its own gradient passes, but calib "
                           "is a shuffling DataLoader: every group would see other batches. Pass a list of batches "
                           "(or oViT's calibration_batches(...)), a loader without shuffle, or max_fisher_mb=None")

