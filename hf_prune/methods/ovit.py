"""oViT / CAP: correlation-aware second-order weight pruning (Kuznedelev et al., arXiv 2210.09223).

Steps (one-shot, :func:`ovit_prune`):

1. **Gradients** (:func:`collect_gradients`): ``m = num_grads`` mini-batch gradients of the
   cross-entropy loss, model in eval mode, gradients of already-masked weights zeroed.
2. **Block-wise empirical Fisher inverse.** Each prunable weight tensor, flattened row-major, is cut
   into blocks of ``B = block_size`` consecutive weights (the last block of a layer may be
   shorter). Per block ``F = λI + (1/m) Σ_i g_i g_iᵀ`` (``λ = damping``) and ``F⁻¹`` is computed by
   **direct inversion** (Cholesky factorisation, then ``cholesky_inverse``) in float64 — exact,
   like the paper code's ``m`` Sherman–Morrison updates from ``I/λ``, but one batched LAPACK
   call instead of ``m`` rank-1 updates, and better conditioned at the paper's ``λ = 1e-8``.
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

Departures and memory:

* **Two passes.** The weights after ``k_b`` removals of block ``b`` depend on ``k_b``, known only
  after the global threshold; instead of keeping every block's ``F⁻¹`` (``d·B`` floats: ~16 GB
  fp32 for DeiT-S at ``B = 192``), pass 1 records the removal order and accumulated losses, pass 2
  rebuilds ``F⁻¹`` and replays the recorded order for ``k_b`` steps. Blocks are processed in chunks
  of at most ``chunk_bytes`` of ``F⁻¹`` (default 256 MiB). Peak memory ≈ gradients
  (``m·d`` in ``grad_dtype``) + order/losses (6 bytes per weight) + one chunk (×~3 with temporaries).
* **Defaults for a CPU.** ``block_size=64`` and ``num_grads=64`` (paper code for ViTs: ``B = 192``,
  ``m = 4096``); the removal loop costs ``O(d·B²)``. With ``m < B`` the Fisher blocks are rank
  deficient and ``λ`` decides the scale of directions no gradient saw; raise ``num_grads`` (or
  ``damping``) when calibration data allow.
* The Fisher inversion and removal loops run on the **CPU** in ``dtype`` (float64 by default; the
  paper code works in fp32 on the GPU): weights and gradients are copied there chunk by chunk and
  the updated weights written back to the model's device. Gradients are stored on the CPU too.
* Mini-batch gradients, as in the paper code (not per-sample gradients); with ``loss_fn`` any
  ``loss_fn(logits, labels)`` replaces cross-entropy. In :class:`OViTCallback`, without ``calib``,
  the last ``m`` training gradients (after clipping/averaging, model in train mode) are used.
* The gradual recipe (cubic schedule 40→75% with fine-tuning, lr restarts) is a schedule given to
  :class:`OViTCallback`; the paper's augmentations and lr restarts are the training script's job.
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

from ..errors import PruningError
from ..weight_masks import WeightMasks, forward_logits, iter_batches

logger = logging.getLogger(__name__)

__all__ = ["collect_gradients", "obs_prune_layer", "ovit_prune", "OViTCallback"]


# ----------------------------------------------------------------------------------------- gradients


def _loss(logits: torch.Tensor, labels, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(logits, labels)
    if labels is None:
        raise PruningError("oViT needs labels in the calibration batches (for the cross-entropy gradients), "
                           "or a loss_fn(logits, labels) that works without them")
    return nn.functional.cross_entropy(logits, labels)


def collect_gradients(model: nn.Module, calib, names: Sequence[str], num_grads: int, *,
                      masks: WeightMasks | None = None, loss_fn=None,
                      grad_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{layer: G}`` with ``G`` of shape ``(m, numel)``: one gradient of the mean loss per
    calibration mini-batch (model in eval mode; masked weights' gradients zeroed). Only the named
    weights require grad during the passes. ``calib`` is re-iterated if it has fewer than
    ``num_grads`` batches; if it cannot be (a generator), fewer gradients are used, with a warning."""
    if num_grads < 1:
        raise ValueError(f"num_grads={num_grads} must be >= 1")
    mods = dict(model.named_modules())
    weights = {n: mods[n].weight for n in names}
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {n: torch.zeros((num_grads, w.numel()), dtype=grad_dtype) for n, w in weights.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for _ in range(num_grads):  # passes over calib
            got = 0
            for inputs, labels in iter_batches(calib, None, device):
                for w in weights.values():
                    w.grad = None
                with torch.enable_grad():
                    loss = _loss(forward_logits(model, inputs), labels, loss_fn)
                    loss.backward()
                for n, w in weights.items():
                    if w.grad is None:  # the layer took no part in this forward pass
                        grads[n][count].zero_()
                        continue
                    g = w.grad.detach()
                    if masks is not None and n in masks:
                        g = g * masks[n].to(g.dtype)
                    grads[n][count].copy_(g.reshape(-1))
                count += 1
                got += 1
                if count == num_grads:
                    break
            if count == num_grads or got == 0:
                break
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for w in weights.values():
            w.grad = None
        model.train(was_training)
    if count == 0:
        raise PruningError("calib yielded no batches")
    if count < num_grads:
        warnings.warn(f"calib gave only {count} mini-batch gradients of the num_grads={num_grads} asked for; "
                      f"using {count}", stacklevel=3)
        grads = {n: g[:count].contiguous() for n, g in grads.items()}
    return grads


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


def _finv(G: torch.Tensor, damping: float, dtype: torch.dtype) -> torch.Tensor:
    """``(λI + GᵀG/m)⁻¹`` per block; ``G``: (m, nb, B) → (nb, B, B)."""
    m = G.shape[0]
    Gc = G.to(dtype).permute(1, 0, 2)  # (nb, m, B)
    F = torch.bmm(Gc.transpose(1, 2), Gc).div_(m)
    F.diagonal(dim1=1, dim2=2).add_(damping)
    L, bad = torch.linalg.cholesky_ex(F)
    if bool(bad.any()):  # numerically not positive definite: add damping until it is
        extra = max(damping, 1e-12) * 10
        for _ in range(12):
            F.diagonal(dim1=1, dim2=2).add_(extra)
            L, bad = torch.linalg.cholesky_ex(F)
            if not bool(bad.any()):
                break
            extra *= 10
        else:
            raise PruningError("empirical Fisher block is not positive definite even with extra damping")
    return torch.cholesky_inverse(L)


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
    """Pass 1 and pass 2 for one layer, chunk by chunk (see module docstring)."""

    def __init__(self, name: str, weight: torch.Tensor, grads: torch.Tensor, keep: torch.Tensor | None, *,
                 block_size: int, damping: float, nm, dtype: torch.dtype, chunk_bytes: int):
        self.name, self.weight, self.grads = name, weight, grads
        self.keep = keep.reshape(-1).cpu() if keep is not None else None
        self.damping, self.nm, self.dtype = float(damping), nm, dtype
        d = weight.numel()
        self.d = d
        B = min(block_size, d)
        if nm is not None:
            n_, m_ = nm
            cols = weight[0].numel() if weight.dim() > 1 else d
            if cols % m_ or B % m_:
                raise PruningError(f"{n_}:{m_} sparsity on {name!r} needs its input dimension ({cols}) and "
                                   f"block_size ({B}) to be multiples of {m_}; exclude the layer or change "
                                   "block_size")
        self.segments = []  # (start, block size, number of blocks)
        nb = d // B
        if nb:
            self.segments.append((0, B, nb))
        if d - nb * B:
            self.segments.append((nb * B, d - nb * B, 1))
        itemsize = torch.finfo(dtype).bits // 8
        self.chunk_blocks = [max(1, int(chunk_bytes // (bs * bs * itemsize))) for _, bs, _ in self.segments]
        self.acc: list[torch.Tensor] = []
        self.order: list[torch.Tensor] = []

    def steps(self, bs: int) -> int:
        if self.nm is None:
            return bs
        n_, m_ = self.nm
        return bs * (m_ - n_) // m_

    def _chunks(self):
        flat = self.weight.detach().reshape(-1)
        m = self.grads.shape[0]
        for si, ((start, bs, nb), cb) in enumerate(zip(self.segments, self.chunk_blocks)):
            for b0 in range(0, nb, cb):
                b1 = min(nb, b0 + cb)
                lo, hi = start + b0 * bs, start + b1 * bs
                W = flat[lo:hi].to("cpu", self.dtype).reshape(b1 - b0, bs).clone()
                G = self.grads[:, lo:hi].reshape(m, b1 - b0, bs)
                prior = self.keep[lo:hi].reshape(b1 - b0, bs) if self.keep is not None else None
                yield si, b0, b1, lo, hi, W, G, prior

    def sweep(self) -> None:
        self.acc = [torch.empty((nb, self.steps(bs)), dtype=torch.float32) for _, bs, nb in self.segments]
        self.order = [torch.empty((nb, self.steps(bs)), dtype=torch.int16 if bs < 2 ** 15 else torch.int32)
                      for _, bs, nb in self.segments]
        for si, b0, b1, lo, hi, W, G, prior in self._chunks():
            Finv = _finv(G, self.damping, self.dtype)
            a, o = _sweep(W, Finv, self.acc[si].shape[1], prior, self.nm)
            self.acc[si][b0:b1] = a
            self.order[si][b0:b1] = o
            del Finv

    def prior_pruned(self) -> int:
        return 0 if self.keep is None else int(self.keep.numel() - int(self.keep.sum()))

    @torch.no_grad()
    def apply(self, counts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Write the updated weights into the layer; returns (keep-mask, predicted loss increase)."""
        contiguous = self.weight.is_contiguous()
        flat = self.weight.data.view(-1) if contiguous else self.weight.data.flatten()  # copy if strided
        keep = torch.ones(self.d, dtype=torch.bool)
        loss = 0.0
        for si, b0, b1, lo, hi, W, G, prior in self._chunks():
            c = counts[si][b0:b1]
            if not bool((c > 0).any()):
                continue
            Finv = _finv(G, self.damping, self.dtype)
            k = _replay(W, Finv, self.order[si][b0:b1], c)
            keep[lo:hi] = k.reshape(-1)
            flat[lo:hi] = W.reshape(-1).to(flat.device, flat.dtype)
            a = self.acc[si][b0:b1]
            idx = (c - 1).clamp_min(0).unsqueeze(1).long()
            last = a.gather(1, idx).squeeze(1)
            loss += float(torch.where((c > 0) & (last >= 0) & torch.isfinite(last), last.double(),
                                      torch.zeros_like(last, dtype=torch.float64)).sum())
        if not contiguous:
            self.weight.data.copy_(flat.view(self.weight.shape))
        return keep.reshape(self.weight.shape), loss


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


def obs_prune_layer(weight: torch.Tensor, grads: torch.Tensor, sparsity: float, *, block_size: int = 64,
                    damping: float = 1e-8, nm: tuple[int, int] | None = None, keep: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64, chunk_bytes: int = 256 << 20, inplace: bool = False,
                    num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """OBS selection inside one layer at a given sparsity (the selection half of oViT).

    ``weight``: the tensor; ``grads``: (m, weight.numel()) gradients defining the empirical Fisher.
    Returns ``(new weight, keep-mask, predicted loss increase)``; the weight is changed in place
    only with ``inplace=True``. ``nm`` ignores ``sparsity`` (exactly ``1 − N/M``).
    """
    w = weight if inplace else weight.detach().clone()
    lay = _LayerOBS("layer", w, grads, keep, block_size=block_size, damping=damping, nm=nm, dtype=dtype,
                    chunk_bytes=chunk_bytes)
    with _threads(num_threads):
        lay.sweep()
        if nm is not None:
            counts = [torch.full((a.shape[0],), a.shape[1], dtype=torch.long) for a in lay.acc]
        else:
            k = max(int(round(float(sparsity) * lay.d)), lay.prior_pruned())
            counts = _counts_below(lay.acc, k)
        new_keep, loss = lay.apply(counts)
    return w, new_keep, loss


# ----------------------------------------------------------------------------------------- one-shot


def ovit_prune(model: nn.Module, sparsity: float, calib, *, block_size: int = 64, num_grads: int = 64,
               damping: float = 1e-8, nm: tuple[int, int] | None = None, allocation=None,
               masks: WeightMasks | None = None, grads: Mapping[str, torch.Tensor] | None = None, loss_fn=None,
               dtype: torch.dtype = torch.float64, grad_dtype: torch.dtype = torch.float32,
               chunk_bytes: int = 256 << 20, num_threads: int | None = None, info: dict | None = None,
               **layer_opts) -> dict:
    """One-shot oViT pruning of ``model`` in place to ``sparsity`` (fraction of the prunable weights).

    ``block_size`` (B), ``num_grads`` (m), ``damping`` (λ): see the module docstring. ``nm=(2, 4)``
    for N:M. ``allocation=None`` is the paper's global threshold on the OBS losses; a name of
    :data:`~hf_prune.methods.weight_allocation.ALLOCATORS` or ``{layer: sparsity}`` fixes per-layer
    sparsities instead (OBS still chooses and updates weights inside each layer). ``grads``: precomputed
    ``{layer: (m, numel)}`` gradients (skips :func:`collect_gradients`). ``info`` receives timings and
    memory-relevant sizes. Without ``masks`` this goes through
    :func:`~hf_prune.methods.weight_allocation.prune_weights` (layer discovery via ``layer_opts``,
    transactional, masks attached to the model) and returns its stats.
    """
    if masks is None:
        from .weight_allocation import prune_weights

        return prune_weights(model, method="ovit", sparsity=sparsity, calib=calib, allocation=allocation, nm=nm,
                             block_size=block_size, num_grads=num_grads, damping=damping, grads=grads,
                             loss_fn=loss_fn, dtype=dtype, grad_dtype=grad_dtype, chunk_bytes=chunk_bytes,
                             num_threads=num_threads, info=info, **layer_opts)
    if layer_opts:
        raise TypeError(f"unexpected options {sorted(layer_opts)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if damping <= 0:
        raise ValueError(f"damping={damping} must be > 0")
    names = masks.layers
    t0 = time.perf_counter()
    if grads is None:
        grads = collect_gradients(model, calib, names, num_grads, masks=masks, loss_fn=loss_fn, grad_dtype=grad_dtype)
    t_grad = time.perf_counter() - t0
    layers = [_LayerOBS(n, masks.weight(n), grads[n], masks[n], block_size=block_size, damping=damping, nm=nm,
                        dtype=dtype, chunk_bytes=chunk_bytes) for n in names]
    t1 = time.perf_counter()
    with _threads(num_threads):
        for lay in layers:
            lay.sweep()
    t_sweep = time.perf_counter() - t1
    if nm is not None:
        counts = {lay.name: [torch.full((a.shape[0],), a.shape[1], dtype=torch.long) for a in lay.acc]
                  for lay in layers}
        alloc_name = f"{nm[0]}:{nm[1]}"
    elif allocation is None:
        N = sum(lay.d for lay in layers)
        k = max(int(round(sparsity * N)), sum(lay.prior_pruned() for lay in layers))
        flat = _counts_below([a for lay in layers for a in lay.acc], k)
        counts, i = {}, 0
        for lay in layers:
            counts[lay.name] = flat[i:i + len(lay.acc)]
            i += len(lay.acc)
        alloc_name = "ovit-global"
    else:
        from .weight_allocation import allocate

        if isinstance(allocation, Mapping):
            targets, alloc_name = dict(allocation), "explicit"
        else:
            targets = allocate(allocation, {n: masks.weight(n) for n in names}, sparsity, keep=masks.masks)
            alloc_name = allocation
        counts = {lay.name: _counts_below(lay.acc, max(int(round(targets.get(lay.name, 0.0) * lay.d)),
                                                       lay.prior_pruned())) for lay in layers}
    t2 = time.perf_counter()
    predicted = 0.0
    with _threads(num_threads):
        for lay in layers:
            keep, loss = lay.apply(counts[lay.name])
            masks.set(lay.name, keep)
            predicted += loss
    masks.enforce()
    t_apply = time.perf_counter() - t2
    if info is not None:
        info.update(grad_seconds=t_grad, sweep_seconds=t_sweep, apply_seconds=t_apply,
                    num_grads=int(next(iter(grads.values())).shape[0]), predicted_loss=predicted,
                    grad_bytes=int(sum(g.numel() * g.element_size() for g in grads.values())))
    return {"allocation": alloc_name, "predicted_loss": predicted}


# ----------------------------------------------------------------------------------------- callback


def _build_ovit_callback():
    from .weight_allocation import weight_pruning_callback_base

    Base = weight_pruning_callback_base()

    class OViTCallback(Base):
        """oViT gradual pruning during ``Trainer.train()``: the paper's recipe is a cubic schedule
        (e.g. ``initial=0.4, sparsity=0.75``) with fine-tuning between pruning steps; masks are
        re-applied after every optimizer step and only grow.

        Gradients for the Fisher: from ``calib`` (``calib=`` batches with labels) if given; otherwise
        the last ``num_grads`` *training* gradients before each pruning step, captured in
        ``on_pre_optimizer_step`` (after clipping and DDP averaging; model in train mode, unlike the
        paper's eval-mode calibration gradients). A pruning step is postponed until ``num_grads``
        gradients were seen (at the schedule's last step it proceeds with what it has). Memory of the
        buffer: ``num_grads × prunable weights`` floats, held only in the window before a pruning step.
        ``block_size``, ``num_grads``, ``damping``, ``nm``, ``dtype``, ``chunk_bytes``: see
        :func:`ovit_prune`. ``allocation=None`` is the global OBS threshold.
        """

        method = "ovit"

        def __init__(self, *, sparsity: float | None = None, block_size: int = 64, num_grads: int = 64,
                     damping: float = 1e-8, nm: tuple[int, int] | None = None, dtype: torch.dtype = torch.float64,
                     chunk_bytes: int = 256 << 20, **kwargs):
            opts = dict(kwargs.pop("method_options", None) or {})
            opts.update(block_size=int(block_size), num_grads=int(num_grads), damping=float(damping),
                        dtype=dtype, chunk_bytes=int(chunk_bytes))
            if nm is not None:
                opts["nm"] = tuple(nm)
            if nm is not None and sparsity is None:
                sparsity = 1.0 - nm[0] / nm[1]
            super().__init__(sparsity=sparsity, method_options=opts, **kwargs)
            self.num_grads = int(num_grads)

        @property
        def settings(self) -> dict:
            s = super().settings
            if "nm" in self.method_options:
                s["nm"] = list(self.method_options["nm"])
            return s

        def _reset(self) -> None:
            super()._reset()
            self._grads: dict | None = None
            self._grad_count = 0
            self._prune_steps: list[int] | None = None

        def _use_training_grads(self) -> bool:
            return self.calib is None

        def ready_to_prune(self) -> bool:
            if not self._use_training_grads():
                return True
            end = self.schedule.steps(self.total_steps)[1]
            return self._grad_count >= self.num_grads or (self._grad_count > 0 and self.step >= end)

        def _in_window(self) -> bool:
            if self.pending:
                return True
            if self._prune_steps is None:
                self._prune_steps = self.schedule.pruning_steps(self.total_steps)
            return any(0 < p - self.step <= self.num_grads for p in self._prune_steps)

        @torch.no_grad()
        def pre_optimizer_step(self) -> None:
            super().pre_optimizer_step()
            if self.finished or not self._use_training_grads() or not self._in_window():
                return
            if self._grads is None:
                self._grads = {n: torch.zeros((self.num_grads, self.masks.weight(n).numel()), dtype=torch.float32)
                               for n in self.masks.layers}
                self._grad_count = 0
            slot = self._grad_count % self.num_grads
            for n in self.masks.layers:
                w = self.masks.weight(n)
                if w.grad is None:
                    return
            for n in self.masks.layers:
                w = self.masks.weight(n)
                self._grads[n][slot].copy_((w.grad.detach() * self.masks[n].to(w.grad.dtype)).reshape(-1))
            self._grad_count += 1

        def prune_masks(self, sparsity: float) -> None:
            from .weight_allocation import prune_weights

            opts = dict(self.method_options)
            if "nm" in opts:  # N:M is all-or-nothing: any pruning step applies the full pattern
                sparsity = None
            if self._use_training_grads():
                k = min(self._grad_count, self.num_grads)
                opts["grads"] = {n: g[:k] for n, g in self._grads.items()}
                calib = None
            else:
                calib = self.calibration()
            prune_weights(self.model, method="ovit", sparsity=sparsity, calib=calib, allocation=self.allocation,
                          **opts)

        def after_prune(self) -> None:
            self._grads, self._grad_count = None, 0

    OViTCallback.__module__ = __name__
    return OViTCallback


def __getattr__(name: str):
    if name == "OViTCallback":
        cls = globals()[name] = _build_ovit_callback()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
