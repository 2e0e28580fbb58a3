"""Layer-wise reconstruction after structured pruning: re-fit what the removal disturbed.

:func:`reconstruct` takes a compacted pruned model and the dense model it came from and walks the
layers in forward order (:func:`reconstruct_pruned`: the same for a model a pruner just compacted). Compaction keeps module paths, so a pruned layer and its dense original are
found by path; which outputs a pruned layer kept comes from the dependency graph
(:func:`kept_indices`), because matching weights by value is ambiguous exactly where it matters
(zero and duplicated channels).

* A **consumer** (a Conv/Linear whose per-group input width shrank: a ViT's attention output
  projection and MLP ``fc2``, a CNN's 1x1 / kxk conv or classifier reading pruned channels) gets new
  weights and bias by ridge least squares::

      min_W ||X W^T - Y||^2 + lam ||W - W0||^2,    lam = ridge * mean(diag(X^T X))

  X: the layer's inputs in the pruned model, whose earlier layers are already re-fitted; Y: the dense
  layer's outputs on the same batch, restricted to the kept outputs; W0: the current (sliced dense)
  weights. Pulling towards W0 rather than zero keeps a layer that lost nothing exactly as it was.
  A depthwise conv (or a grouped conv that lost whole groups) lost whole channels, not inputs: it has
  nothing to re-fit (``layers="all"`` re-fits every Conv/Linear after the first change anyway, to
  counter the drift of its inputs).
* A **weight-pruned** layer (a model carrying :class:`~hf_prune.sparse.masks.WeightMasks`) keeps its
  shape but lost individual weights: the same objective is minimised over its kept weights only, the
  pruned ones held at exactly zero. Solving each output row's own system would cost a factorisation
  per row, so the pruned weights are removed one input column at a time from the unconstrained
  solution, each removal compensated on the later columns by the Optimal Brain Surgeon update read
  off the Cholesky factor of the inverse Gram matrix (the column-sequential scheme SparseGPT uses for
  LLMs); exact for a row whose pruned weights come first, near-optimal otherwise.
* A layer without bias whose output goes straight into a BatchNorm is fitted with an intercept too,
  which the BN absorbs exactly (BN(Wx + b) with running mean m is BN(Wx) with mean m − b). Such a BN
  then sees what the dense BN saw, up to the fit's residual; its variance is deliberately left alone:
  a least-squares fit predicts E[y | x], whose variance is smaller than y's by the residual, and
  re-standardising would amplify the residual instead of the signal.
* **BatchNorm** statistics of the other BNs downstream of the first change (``bn=``): ``"mean"``
  (default) keeps the dense running statistics and moves each BN's mean by how much its input in the
  pruned model differs from the dense model's on the calibration batches, in forward order;
  ``"moments"`` moves the variance too (the BN then maps pruned inputs where the dense BN mapped
  dense inputs; with no difference it is unchanged); ``"recalibrate"`` re-estimates every BN after
  the first change from the calibration batches alone
  (:func:`hf_prune.core.execution.recalibrate_batchnorm`), which replaces statistics estimated on
  the training set by ones from a few images; ``None`` leaves them. With ``layers=[]``
  only the BN step runs: after weight pruning, whose layers keep their shapes, it starts at the first
  layer whose weights differ from the dense model's.

Cost: the dense model's side of every site (outputs on sampled rows, BN input moments) comes from as
few dense passes as ``cache_mb`` allows. The pruned side needs the inputs of each site with every
earlier site already re-fitted: a site inside a child of a plain ``nn.Sequential`` (timm's stages and
blocks) runs only that child from its cached input, so each block runs about once per site inside it
instead of the whole prefix; elsewhere (ModuleLists, custom forwards) the model runs from its inputs,
stopping at the site. Memory: per layer only ``X^T X``, ``X^T Y`` and moment sums (float64), convs
through ``unfold`` on chunks of images with at most ``max_rows`` sampled rows per batch, grouped
convs solved per group.

Other methods: SP extracts a subnet through the same engine, so the same call applies (keep from its
graph and removed units). UPDP's merge needs none: it is an exact re-parameterisation of blocks whose
activations were annealed to identity during training (its one-shot variant removes the activations
at once and recalibrates BNs; re-fitting a merged block against the dense block it replaced would need
a block-to-block correspondence this module does not have).

Exact where it should be: a layer whose inputs lost nothing, or only channels that are exactly zero,
has ``Y = X W0^T`` and keeps ``W0``; with nothing removed, nothing is re-fitted or corrected. A layer
whose computation is not the plain conv/linear of its weights (weight standardisation, dynamic
"same" padding) fails a self-check on the first batch and is left as it was, with a warning.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_choice, check_int, check_number
from ..core.execution import eval_mode, recalibrate_batchnorm
from ..core.inputs import call_model, model_device, split_batch, to_device
from ..errors import PruningError

__all__ = ["reconstruct", "kept_indices", "consumer_layers", "BN_MODES"]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
BN_MODES = ("mean", "moments", "recalibrate", None)
_SELF_CHECK_TOL = 1e-3  # relative; float32 convs agree to ~1e-6, a different computation does not
_UNFOLD_ELEMENTS = 1 << 24  # images are unfolded in chunks of at most this many elements
_OBS_BLOCK = 128  # columns whose OBS updates are applied one by one before one matmul updates the rest


def kept_indices(graph, removed) -> dict[str, dict[int, torch.Tensor]]:
    """``{tensor name: {dim: kept indices}}`` for every parameter or buffer that loses slices when the
    units ``removed`` (root ids, or a boolean keep mask over roots) of ``graph`` go; tied names are
    listed under each of their names. Take it before or after compaction: it reads the graph only."""
    removed = torch.as_tensor(removed)
    keep = removed if removed.dtype == torch.bool else graph.keep_mask(removed.reshape(-1).long())
    out: dict[str, dict[int, torch.Tensor]] = {}
    for m in graph.members:
        idx = graph.kept_indices(m, keep)
        if idx.numel() < m.units.numel():
            out.setdefault(m.tensor, {})[m.dim] = idx
    for alias, canonical in graph.trace.aliases.items():
        if canonical in out and alias != canonical:
            out[alias] = out[canonical]
    return out


# ----------------------------------------------------------------------------------------- layers


def _per_group_in(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups


def _groups(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else module.groups


def consumer_layers(pruned: nn.Module, dense: nn.Module) -> list[str]:
    """Conv/Linear paths whose per-group input width is smaller in ``pruned`` than in ``dense``."""
    dense_modules = dict(dense.named_modules())
    names = []
    for name, m in pruned.named_modules():
        d = dense_modules.get(name)
        if isinstance(m, LAYER_TYPES) and type(d) is type(m) and _per_group_in(m) < _per_group_in(d):
            names.append(name)
    return names


def _padding(conv: nn.Module) -> tuple | None:
    """Explicit zero padding of a conv, or None when unfold cannot reproduce it."""
    if conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        if any(s != 1 for s in conv.stride) or any((d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
            return None  # asymmetric "same" padding
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def _sample(rows: int, max_rows: int, g: torch.Generator) -> torch.Tensor | None:
    """Sorted row indices to keep (None: all rows)."""
    return None if rows <= max_rows else torch.randperm(rows, generator=g)[:max_rows].sort().values


def _out_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's outputs as (rows, O): one row per token (Linear) or per image and position (conv)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _in_rows(module: nn.Module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """A layer's inputs as (rows, D), columns in the weight's (in, kernel) order, rows as in :func:`_out_rows`;
    convs are unfolded a chunk of images at a time and only the rows ``idx`` kept."""
    if isinstance(module, nn.Linear):
        X = x.reshape(-1, x.shape[-1])
        return X if idx is None else X[idx.to(X.device)]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation, stride = (1,) + module.kernel_size, (1,) + module.dilation, (1,) + module.stride
        padding = (0,) + _padding(module)
    else:
        kernel, dilation, stride, padding = module.kernel_size, module.dilation, module.stride, _padding(module)
    n, d = x.shape[0], x.shape[1] * math.prod(kernel)
    first = F.unfold(x[:1], kernel, dilation=dilation, padding=padding, stride=stride)
    positions = first.shape[-1]
    chunk = max(1, _UNFOLD_ELEMENTS // max(1, d * positions))
    parts = []
    for s in range(0, n, chunk):
        cols = F.unfold(x[s:s + chunk], kernel, dilation=dilation, padding=padding, stride=stride)
        rows = cols.transpose(1, 2).reshape(-1, d)
        if idx is not None:
            local = idx[(idx >= s * positions) & (idx < (s + chunk) * positions)] - s * positions
            rows = rows[local.to(rows.device)]
        parts.append(rows)
    return torch.cat(parts)


def _weight(module: nn.Module, intercept: bool = False) -> torch.Tensor:
    """(G, O/G, D) weights, with the bias (or a zero intercept) as the last column when there is one."""
    g = _groups(module)
    w = module.weight.detach().reshape(g, module.weight.shape[0] // g, -1).double()
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().reshape(g, -1, 1).double()], dim=2)
    elif intercept:
        w = torch.cat([w, w.new_zeros(g, w.shape[1], 1)], dim=2)
    return w


@dataclass
class _Normal:
    """Normal equations of one layer, per group: H = X^T X, C = X^T Y, plus moment sums."""

    H: torch.Tensor  # (G, D, D)
    C: torch.Tensor  # (G, D, O/G)
    sx: torch.Tensor  # (G, D): column sums of X
    sy: torch.Tensor  # (O,): sums of Y
    syy: torch.Tensor  # (O,): sums of Y^2
    rows: int = 0

    @classmethod
    def empty(cls, w: torch.Tensor, device) -> "_Normal":
        g, og, d = w.shape
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(g, d, d), z(g, d, og), z(g, d), z(g * og), z(g * og))

    def add(self, X: torch.Tensor, Y: torch.Tensor, bias: bool) -> None:
        g = self.H.shape[0]
        X = X.double().reshape(X.shape[0], g, -1)
        if bias:
            X = torch.cat([X, X.new_ones(X.shape[0], g, 1)], dim=2)
        Y = Y.double()
        Yg = Y.reshape(Y.shape[0], g, -1)
        self.H += torch.einsum("rgd,rge->gde", X, X)
        self.C += torch.einsum("rgd,rgo->gdo", X, Yg)
        self.sx += X.sum(0)
        self.sy += Y.sum(0)
        self.syy += Y.square().sum(0)
        self.rows += X.shape[0]

    def error(self, w: torch.Tensor) -> float:
        """Σ ||X w^T - Y||^2 from the accumulated sums alone."""
        quad = torch.einsum("god,gde,goe->", w, self.H, w)
        cross = torch.einsum("god,gdo->", w, self.C)
        return float(quad - 2 * cross + self.syy.sum())

    def solve(self, w0: torch.Tensor, ridge: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Ridge solution pulled towards ``w0``; with ``keep`` ((G, O/G, D) bool), every output row is
        fitted on its kept weights only and its other weights stay exactly zero."""
        diag = torch.diagonal(self.H, dim1=1, dim2=2)
        lam = ridge * diag.mean(dim=1).clamp_min(1e-12)  # per group, relative to the input scale
        if keep is not None:
            return self._solve_masked(w0, lam, keep)
        eye = torch.eye(self.H.shape[1], dtype=self.H.dtype, device=self.H.device)
        A = self.H + lam[:, None, None] * eye
        B = self.C + lam[:, None, None] * w0.transpose(1, 2)
        return _spd_solve(A, B).transpose(1, 2)

    def _solve_masked(self, w0: torch.Tensor, lam: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # The objective is the quadratic (W − W*) A (W − W*)^T per row, W* its unconstrained minimum. Exact
        # per-row solves cost a D×D factorisation per output row (hours for a 3x3 conv with 512 inputs), so
        # the pruned weights are zeroed one column at a time, each removal compensated on the columns
        # to its right by the Optimal Brain Surgeon update; the upper Cholesky factor U of A⁻¹ gives all
        # of those updates (row j of U restricted to j.. is the OBS direction once columns < j are fixed).
        # A row that keeps everything ends at W* exactly; the others at a near-optimal point.
        g, og, d = w0.shape
        eye = torch.eye(d, dtype=self.H.dtype, device=self.H.device)
        A = self.H + lam[:, None, None] * eye
        w = _spd_solve(A, self.C + lam[:, None, None] * w0.transpose(1, 2)).transpose(1, 2).clone()
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A)), upper=True)  # (G, D, D)
        drop = ~keep.to(self.H.device)
        for b0 in range(0, d, _OBS_BLOCK):  # updates inside a block column by column, then the rest at once
            b1 = min(b0 + _OBS_BLOCK, d)
            if not bool(drop[:, :, b0:b1].any()):
                continue
            wb, ub = w[:, :, b0:b1].clone(), U[:, b0:b1, b0:b1]
            errs = torch.zeros_like(wb)
            for i in range(b1 - b0):
                rows = drop[:, :, b0 + i]
                errs[:, :, i] = torch.where(rows, wb[:, :, i] / ub[:, i, i][:, None], torch.zeros_like(wb[:, :, i]))
                wb[:, :, i:] -= errs[:, :, i:i + 1] * ub[:, None, i, i:]
                wb[:, :, i] = torch.where(rows, torch.zeros_like(wb[:, :, i]), wb[:, :, i])
            w[:, :, b0:b1] = wb
            w[:, :, b1:] -= torch.einsum("goi,gie->goe", errs, U[:, b0:b1, b1:])
        return w

    def moments(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output channel: mean and mean square of ``X w^T`` (the pruned layer's outputs)."""
        mean = torch.einsum("god,gd->go", w, self.sx).reshape(-1) / self.rows
        sq = torch.einsum("god,gde,goe->go", w, self.H, w).reshape(-1) / self.rows
        return mean, sq


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A⁻¹B for (batched) symmetric positive definite A; least squares where Cholesky fails."""
    chol, info = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(B, chol) if not bool(info.any()) else torch.linalg.lstsq(A, B).solution


# ----------------------------------------------------------------------------------------- passes


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


class _Order:
    """What one dense forward pass tells: layers and BNs in order of first call, call counts, when each
    module starts and ends (event counters), and for each BN the layer whose output it reads directly."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, inputs):
        names = {m: n for n, m in model.named_modules()}
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.feeds: dict[str, str] = {}
        last: list = [None, None]  # the latest Conv/Linear output and its name
        clock = [0]

        def pre(mod, args):
            n = names[mod]
            clock[0] += 1
            self.start.setdefault(n, clock[0])
            if _is_bn(mod) and n not in self.calls and args and args[0] is last[0]:
                self.feeds[n] = last[1]

        def post(mod, args, out):
            n = names[mod]
            clock[0] += 1
            self.end[n] = clock[0]
            if n not in self.calls and (isinstance(mod, LAYER_TYPES) or _is_bn(mod)):
                self.order.append(n)
            self.calls[n] = self.calls.get(n, 0) + 1
            if isinstance(mod, LAYER_TYPES):
                last[:] = [out, n]

        handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
        try:
            call_model(model, inputs)
        finally:
            for h in handles:
                h.remove()


def _head(inputs, n: int):
    """The first ``n`` samples of a batch (tensor, tuple or mapping of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n] if inputs.dim() else inputs
    if isinstance(inputs, dict):
        return {k: _head(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_head(v, n) for v in inputs)
    return inputs


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


class _Runner:
    """Runs the pruned model up to a site on every calibration batch, as cheaply as it can.

    A site inside a child of a plain ``nn.Sequential`` (called once per forward) is reached by running
    that child from its cached input instead of the whole model from the start: the input of a child
    is the output of the child before it, or the input of the Sequential itself. Inputs computed before
    a re-fit stay valid for every module that starts before the re-fitted layer and are dropped for
    the others; inputs of modules that ended before the current site are no longer needed. Elsewhere
    (ModuleLists, custom forwards) the model is run from its inputs, stopping at the site.
    """

    def __init__(self, model: nn.Module, batches: list, order: _Order):
        self.model, self.batches, self.o = model, batches, order
        self.chain: dict[str, tuple[str, int, list]] = {}  # child path -> (Sequential, index, sibling paths)
        for name, m in model.named_modules():
            if _plain_sequential(m) and order.calls.get(name) == 1:
                kids = [f"{name}.{c}" if name else c for c, _ in m.named_children()]
                for i, k in enumerate(kids):
                    if order.calls.get(k) == 1:
                        self.chain[k] = (name, i, kids)
        self.inputs: dict[str, list] = {}  # module path -> per-batch input (None until computed)

    def _entry(self, site: str) -> str | None:
        """The innermost ancestor-or-self of ``site`` whose input can be cached (a Sequential's child)."""
        parts = site.split(".")
        for k in range(len(parts), 0, -1):
            path = ".".join(parts[:k])
            if path in self.chain:
                return path
        return None

    def _input(self, path: str, b: int):
        cached = self.inputs.setdefault(path, [None] * len(self.batches))
        if cached[b] is None:
            seq, i, kids = self.chain[path]
            if i > 0:
                prev = self.model.get_submodule(kids[i - 1])
                cached[b] = prev(self._input(kids[i - 1], b))
            elif seq in self.chain:
                cached[b] = self._input(seq, b)
            else:
                cached[b] = self._run(self.model.get_submodule(seq), b, output=False, stop_calls=1, before=True)[0][0]
        return cached[b]

    def _run(self, module: nn.Module, b: int, *, output: bool, stop_calls: int, start: str | None = None,
             before: bool = False) -> list:
        """(input, output) of the first ``stop_calls`` calls of ``module`` (only inputs and without running
        it when ``before``), running from ``start``'s cached input when given, else the whole model."""
        x = self._input(start, b) if start is not None else None  # before any hook of this run is set
        got = []

        def hook(mod, args, out=None):
            got.append((args[0].detach(), out.detach() if output else None))
            if len(got) == stop_calls:
                raise _Stop

        handle = module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook)
        try:
            if start is not None:
                self.model.get_submodule(start)(x)
            else:
                call_model(self.model, self.batches[b])
        except _Stop:
            pass
        finally:
            handle.remove()
        if len(got) < stop_calls:
            raise PruningError(f"reconstruct: module '{_name(self.model, module)}' ran {len(got)} times on a "
                               f"calibration batch, expected {stop_calls}; the dense and pruned models must run "
                               "the same layers")
        return got

    @torch.no_grad()
    def capture(self, site: str, b: int, output: bool) -> list:
        """(input, output) of every call of ``site`` on batch ``b``."""
        if b == 0:
            self._evict(site)
        calls = self.o.calls[site]
        entry = self._entry(site) if calls == 1 else None
        return self._run(self.model.get_submodule(site), b, output=output, stop_calls=calls, start=entry)

    def _evict(self, site: str) -> None:
        now = self.o.start[site]
        for path in [p for p in self.inputs if self.o.end[p] < now]:
            del self.inputs[path]

    def changed(self, site: str) -> None:
        """``site`` was re-fitted or corrected: inputs of modules starting after it are stale."""
        now = self.o.start[site]
        for path in [p for p in self.inputs if self.o.start[p] > now]:
            del self.inputs[path]


def _name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def _batches(calib, max_batches: int | None, device) -> list:
    if isinstance(calib, torch.Tensor):
        calib = list(calib.split(32))
    out = []
    for batch in calib:
        if max_batches is not None and len(out) >= max_batches:
            break
        inputs, _ = split_batch(batch)
        out.append(to_device(inputs, device))
    if not out:
        raise PruningError("reconstruct needs calibration data: calib= a tensor of model inputs or an iterable of "
                           "batches (tensors, (inputs, labels) tuples or dicts such as {'pixel_values': x})")
    return out


def _out_index(name: str, dense_m: nn.Module, pruned_m: nn.Module, keep) -> torch.Tensor | None:
    """Dense output indices that the pruned layer kept (None: all of them)."""
    out_d, out_p = dense_m.weight.shape[0], pruned_m.weight.shape[0]
    idx = (keep or {}).get(f"{name}.weight", {}).get(0)
    if idx is None and out_p != out_d:
        raise PruningError(f"reconstruct: '{name}' has {out_p} outputs, the dense layer {out_d}, and keep= does not "
                           "say which were kept; pass keep=kept_indices(pruner.graph, pruner.removed)")
    if idx is not None and idx.numel() != out_p:
        raise PruningError(f"reconstruct: keep= lists {idx.numel()} kept outputs of '{name}', which has {out_p}")
    return idx


# ----------------------------------------------------------------------------------------- dense side


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


def _bn_channels(name: str, dense_bn, pruned_bn, keep) -> torch.Tensor | None:
    idx = (keep or {}).get(f"{name}.weight", {}).get(0)
    if idx is None:
        idx = (keep or {}).get(f"{name}.running_mean", {}).get(0)
    if idx is None and pruned_bn.num_features != dense_bn.num_features:
        raise PruningError(f"reconstruct: BatchNorm '{name}' has {pruned_bn.num_features} channels, the dense one "
                           f"{dense_bn.num_features}, and keep= does not say which were kept")
    return idx


def _channel_moments(x: torch.Tensor) -> torch.Tensor:
    """Per channel (dim 1): [sum of x, sum of x^2, count], accumulated in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    total = x.sum(dims, dtype=torch.float64)
    squares = torch.linalg.vector_norm(x, 2, dims, dtype=torch.float64).square()
    return torch.stack([total, squares, torch.full_like(total, x.numel() // x.shape[1])])


class _DenseTargets:
    """The dense model's side of every site, from as few dense passes as ``budget`` bytes allow.

    Layer sites get, per batch and call, the sampled row indices and the dense outputs on those rows
    (kept outputs only); BN sites get per-channel input moments (kept channels only). A pass records
    every site from the first one asked for on, until the cache holds ``budget`` bytes.
    """

    def __init__(self, dense, pruned, batches, sites, calls, keep, max_rows, seed, budget):
        self.dense, self.pruned, self.batches, self.sites = dense, pruned, batches, sites
        self.calls, self.keep, self.max_rows, self.seed, self.budget = calls, keep, max_rows, seed, budget
        self.cache: dict[str, list] = {}
        self.device = model_device(pruned)
        self.passes = 0

    def get(self, site: str) -> list:
        """Per batch: a list over calls of ``(rows, Y)`` (layer) or moments (BN)."""
        if site not in self.cache:
            self._fill(self.sites.index(site))
        return self.cache.pop(site)

    def _entry(self, name, module, x, y, b, call):
        if _is_bn(module):
            idx = _bn_channels(name, module, self.pruned.get_submodule(name), self.keep)
            x = x if idx is None else x.index_select(1, idx.to(x.device))
            return _channel_moments(x).to(self.device)
        Y = _out_rows(module, y)
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.sites.index(name) + 7_919 * b + call)
        rows = _sample(Y.shape[0], self.max_rows, g)
        Y = Y if rows is None else Y[rows.to(Y.device)]
        idx = _out_index(name, module, self.pruned.get_submodule(name), self.keep)
        Y = Y if idx is None else Y.index_select(1, idx.to(Y.device))
        return rows, Y.to(self.device, copy=True)

    @torch.no_grad()
    def _fill(self, first: int) -> None:
        todo = self.sites[first:]
        last = None  # the last site recorded, fixed by the first batch
        per_batch = self.budget / len(self.batches)
        for b, inputs in enumerate(self.batches):
            got: dict[str, list] = {}
            size = [0]

            def record(name, module, x, y):
                entry = self._entry(name, module, x, y, b, len(got.setdefault(name, [])))
                got[name].append(entry)
                size[0] += sum(t.numel() * t.element_size() for t in (entry if isinstance(entry, tuple) else (entry,))
                               if isinstance(t, torch.Tensor))
                nonlocal last
                done = len(got[name]) == self.calls[name]
                if done and (name == last or (last is None and b == 0 and size[0] >= per_batch)):
                    last = name
                    raise _Stop

            handles = []
            for name in todo:
                m = self.dense.get_submodule(name)
                if _is_bn(m):
                    handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: record(n, mod, a[0], None)))
                else:
                    handles.append(m.register_forward_hook(lambda mod, a, out, n=name: record(n, mod, a[0], out)))
            try:
                call_model(self.dense, to_device(inputs, model_device(self.dense)))
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            self.passes += 1
            if b == 0 and last is None:
                last = todo[-1]
            for name in todo[: todo.index(last) + 1]:
                if len(got.get(name, [])) != self.calls[name]:
                    raise PruningError(f"reconstruct: module '{name}' ran {len(got.get(name, []))} times on a "
                                       f"calibration batch, expected {self.calls[name]}")
                self.cache.setdefault(name, []).append(got[name])


# ----------------------------------------------------------------------------------------- sites


def _fit_layer(name, pruned, runner, targets, ridge, fold_into=None):
    """Accumulate, solve and write one layer; returns (normal equations, old and new (G, O/G, D) weights),
    or None when the layer does not compute the plain map of its weights.

    A layer without bias whose output goes straight into the BatchNorm ``fold_into`` is fitted with an
    intercept too, which that BN absorbs exactly: BN(Wx + b) with mean m is BN(Wx) with mean m − b.
    """
    pm = pruned.get_submodule(name)
    if isinstance(pm, (nn.Conv1d, nn.Conv2d)) and _padding(pm) is None:
        warnings.warn(f"reconstruct: '{name}' uses padding the re-fit cannot reproduce; left as it was", stacklevel=3)
        return None
    intercept = pm.bias is not None or fold_into is not None
    w0 = _weight(pm, intercept)
    normal = _Normal.empty(w0, model_device(pruned))
    dense_side = targets.get(name)
    for b in range(len(dense_side)):
        for (rows, Y), (x_p, y_p) in zip(dense_side[b], runner.capture(name, b, output=b == 0)):
            X = _in_rows(pm, x_p, rows)
            if b == 0 and not _self_check(X, _out_rows(pm, y_p), rows, w0, intercept):
                warnings.warn(f"reconstruct: '{name}' ({type(pm).__name__}) does not compute the plain "
                              "convolution/linear map of its weights; left as it was", stacklevel=3)
                return None
            normal.add(X, Y, intercept)
    w = normal.solve(w0, ridge, _kept_weights(pruned, name, w0))
    with torch.no_grad():
        din = w.shape[2] - (1 if intercept else 0)
        pm.weight.copy_(w[:, :, :din].reshape(pm.weight.shape).to(pm.weight.dtype))
        if pm.bias is not None:
            pm.bias.copy_(w[:, :, din].reshape(-1).to(pm.bias.dtype))
        elif fold_into is not None:
            mean = fold_into.running_mean
            mean.copy_((mean.double() - w[:, :, din].reshape(-1)).to(mean.dtype))
    return normal, w0, w


def _kept_weights(pruned: nn.Module, name: str, w0: torch.Tensor) -> torch.Tensor | None:
    """(G, O/G, D) keep-mask of a weight-pruned layer in ``w0``'s layout (bias / intercept kept), or None."""
    from ..sparse.masks import get_weight_masks

    masks = get_weight_masks(pruned)
    if masks is None or name not in masks or bool(masks[name].all()):
        return None
    g, og, d = w0.shape
    keep = masks[name].reshape(g, og, -1)
    if keep.shape[2] < d:
        keep = torch.cat([keep, keep.new_ones(g, og, d - keep.shape[2])], dim=2)
    return keep


def _self_check(X, y_rows, rows, w0, intercept) -> bool:
    """True when the layer's real outputs are ``X w0^T`` (to float32 accuracy) on a few rows."""
    Y = y_rows if rows is None else y_rows[rows.to(y_rows.device)]
    X, Y = X[:512].double(), Y[:512].double()
    g = w0.shape[0]
    Xg = X.reshape(X.shape[0], g, -1)
    if intercept:
        Xg = torch.cat([Xg, Xg.new_ones(X.shape[0], g, 1)], dim=2)
    pred = torch.einsum("rgd,god->rgo", Xg, w0).reshape(Y.shape)
    return float((pred - Y).norm()) <= _SELF_CHECK_TOL * float(Y.norm()) + 1e-12


@torch.no_grad()
def _correct_bn(bn: nn.Module, mean_d, sq_d, mean_p, sq_p, variance: bool) -> None:
    """Move ``bn``'s running statistics so that it maps the pruned inputs where it mapped the dense ones.

    Mean only: m' = m + μ_p − μ_d. With the variance too, assuming x_p ~ μ_p + (σ_p/σ_d)(x_d − μ_d)
    per channel, (x_p − m')/s' = (x_d − m)/s holds for s' = s·σ_p/σ_d and m' = μ_p − (μ_d − m)·σ_p/σ_d,
    where s² = running_var + eps.
    """
    m, v = bn.running_mean.double(), bn.running_var.double()
    if not variance:
        bn.running_mean.copy_((m + mean_p - mean_d).to(bn.running_mean.dtype))
        return
    var_d = (sq_d - mean_d.square()).clamp_min(0)
    var_p = (sq_p - mean_p.square()).clamp_min(0)
    live = var_d > 1e-12 * var_d.max().clamp_min(1e-30)
    ratio = torch.where(live, (var_p / var_d.clamp_min(1e-30)).sqrt(), torch.ones_like(var_d))
    new_m = mean_p - (mean_d - m) * ratio
    new_v = ((v + bn.eps) * ratio.square() - bn.eps).clamp_min(0)
    bn.running_mean.copy_(new_m.to(bn.running_mean.dtype))
    bn.running_var.copy_(new_v.to(bn.running_var.dtype))


def _measure_bn(name, pruned, runner, targets, variance: bool):
    """Correct BN ``name`` from its input moments in both models over the calibration batches."""
    pm = pruned.get_submodule(name)
    dense_side = targets.get(name)
    acc_d = acc_p = 0
    for b in range(len(dense_side)):
        for moments, (x_p, _) in zip(dense_side[b], runner.capture(name, b, output=False)):
            acc_d = acc_d + moments
            acc_p = acc_p + _channel_moments(x_p)
    n = acc_d[2]
    _correct_bn(pm, acc_d[0] / n, acc_d[1] / n, acc_p[0] / n, acc_p[1] / n, variance)


# ----------------------------------------------------------------------------------------- entry point


def reconstruct(pruned: nn.Module, dense: nn.Module, calib, *, keep: dict | None = None, layers="consumers",
                ridge: float = 1e-2, bn: str | None = "mean", max_batches: int | None = 8,
                max_rows: int = 8192, cache_mb: float = 1024, seed: int = 0, progress: bool = True) -> dict:
    """Re-fit ``pruned`` (compacted, in place) towards ``dense`` on calibration batches; returns stats.

    calib: a tensor of model inputs (split into batches of 32) or an iterable of batches (tensors,
    ``(inputs, labels)`` or dicts such as ``{"pixel_values": x}``); the first ``max_batches`` are used.
    keep: ``{tensor name: {dim: kept indices}}`` from :func:`kept_indices` (needed for every layer
    and BN whose outputs were pruned). layers: ``"consumers"`` (layers whose inputs were pruned, and
    the weight-masked layers that lost weights),
    ``"all"`` (every Conv/Linear from the first consumer on) or a list of module paths.
    ridge: the ridge strength relative to the mean diagonal of ``X^T X``. bn: ``"mean"``,
    ``"moments"``, ``"recalibrate"`` or ``None`` (see the module docstring). max_rows: rows (tokens or output
    positions) sampled per batch and layer. cache_mb: memory for the dense model's targets; fewer MB
    mean more dense passes. Both models run in eval mode and keep their modes.

    Returns ``{"layers": {path: {"before": e0, "after": e1}}, "batchnorms": [paths], "sites": n,
    "dense_passes": n, "seconds": t}`` with e = ||X W^T − Y|| / ||Y|| over the calibration rows (before: with the pruned
    weights). On any error (or an interrupt) the pruned model is restored and the error raised.
    """
    ridge = check_number("ridge", ridge, positive=True, meaning="ridge strength relative to mean(diag(X^T X))")
    check_choice("bn", bn, BN_MODES)
    max_rows = check_int("max_rows", max_rows, minimum=1)
    cache_mb = check_number("cache_mb", cache_mb, positive=True)
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, minimum=1)
    started = time.perf_counter()
    batches = _batches(calib, max_batches, model_device(pruned))
    with eval_mode(dense):
        o = _Order(dense, to_device(_head(batches[0], 2), model_device(dense)))
    order = o.order
    fit = _layers_to_fit(pruned, dense, order, layers)
    stats = {"layers": {}, "batchnorms": [], "sites": 0, "dense_passes": 0, "seconds": 0.0}
    first = min(order.index(n) for n in fit) if fit else _first_change(pruned, dense, order)
    if first is None or (not fit and bn is None):
        stats["seconds"] = time.perf_counter() - started
        return stats
    bns = [n for n in order[first:] if _is_bn(pruned.get_submodule(n))]
    saved = {n: t.detach().clone() for n, t in _touched(pruned, fit, bns)}
    try:
        with eval_mode(dense), eval_mode(pruned):
            _sweep(pruned, dense, batches, o, fit, bns, bn if bn in ("mean", "moments") else None, keep, ridge, max_rows, cache_mb * 2 ** 20,
                   seed, progress, stats)
        if bn == "recalibrate":
            bn_modules = [pruned.get_submodule(n) for n in bns]
            recalibrate_batchnorm(pruned, bn_modules, batches, lambda x: call_model(pruned, x))
            stats["batchnorms"] = bns
    except BaseException:
        with torch.no_grad():
            for n, t in _touched(pruned, fit, bns):
                t.copy_(saved[n])
        raise
    stats["seconds"] = time.perf_counter() - started
    return stats


def _masked_layers(pruned: nn.Module) -> list[str]:
    """Layers of a weight-pruned model that lost weights (their kept weights are re-fitted)."""
    from ..sparse.masks import get_weight_masks

    masks = get_weight_masks(pruned)
    return [] if masks is None else [n for n in masks.layers if not bool(masks[n].all())]


def _layers_to_fit(pruned, dense, order, layers) -> list[str]:
    consumers = list(dict.fromkeys(consumer_layers(pruned, dense) + [n for n in _masked_layers(pruned) if n in order]))
    if isinstance(layers, str) and layers == "consumers":
        chosen = consumers
    elif isinstance(layers, str) and layers == "all":
        if not consumers:
            return []
        first = min(order.index(n) for n in consumers if n in order)
        chosen = [n for n in order[first:] if isinstance(pruned.get_submodule(n), LAYER_TYPES)]
    elif isinstance(layers, str):
        raise PruningError(f"reconstruct: layers={layers!r}; use 'consumers', 'all' or a list of module paths")
    else:
        chosen = list(layers)
        for n in chosen:
            if n not in order or not isinstance(pruned.get_submodule(n), LAYER_TYPES):
                raise PruningError(f"reconstruct: layers= names '{n}', which is not a Conv/Linear layer that runs in "
                                   "the dense model's forward pass")
    missing = [n for n in chosen if n not in order]
    if missing:
        raise PruningError(f"reconstruct: {missing[:3]} do not run on the calibration batch")
    return sorted(chosen, key=order.index)


def _first_change(pruned, dense, order) -> int | None:
    """Position in ``order`` of the first module whose own parameters differ from the dense model's."""
    for i, name in enumerate(order):
        p = dict(pruned.get_submodule(name).named_parameters(recurse=False))
        d = dict(dense.get_submodule(name).named_parameters(recurse=False))
        if p.keys() != d.keys() or any(p[k].shape != d[k].shape or not torch.equal(p[k].detach().cpu(), d[k].detach().cpu())
                                       for k in p):
            return i
    return None


def _touched(pruned, fit, bns):
    for n in fit:
        m = pruned.get_submodule(n)
        yield f"{n}.weight", m.weight
        if m.bias is not None:
            yield f"{n}.bias", m.bias
    for n in bns:
        m = pruned.get_submodule(n)
        yield f"{n}.running_mean", m.running_mean
        yield f"{n}.running_var", m.running_var


def _sweep(pruned, dense, batches, o: _Order, fit, bns, correct, keep, ridge, max_rows, budget, seed, progress, stats):
    """Every site in forward order: re-fit a layer (folding its intercept into the BN that reads it), or
    correct a BN that reads no re-fitted layer (``correct``: "mean", "moments" or None)."""
    from ..core.progress import progress as bar

    fit_set = set(fit)
    readers: dict[str, list] = {}
    for b in bns:
        if o.feeds.get(b) in fit_set:
            readers.setdefault(o.feeds[b], []).append(b)
    sites = [n for n in o.order if n in fit_set or (correct and n in bns)]
    targets = _DenseTargets(dense, pruned, batches, sites, o.calls, keep, max_rows, seed, budget)
    runner = _Runner(pruned, batches, o)
    folded: set[str] = set()
    for name in bar(sites, desc="reconstruct", disable=None if progress else True):
        if name in folded:
            targets.cache.pop(name, None)
            continue
        stats["sites"] += 1
        if name not in fit_set:
            _measure_bn(name, pruned, runner, targets, correct == "moments")
            runner.changed(name)
            stats["batchnorms"].append(name)
            continue
        bn_names = readers.get(name, [])
        fold = pruned.get_submodule(bn_names[0]) if len(bn_names) == 1 else None
        done = _fit_layer(name, pruned, runner, targets, ridge, fold)
        if done is None:
            continue
        runner.changed(name)
        normal, w0, w = done
        y2 = float(normal.syy.sum()) or 1.0
        stats["layers"][name] = {"before": max(normal.error(w0), 0.0) ** 0.5 / y2 ** 0.5,
                                 "after": max(normal.error(w), 0.0) ** 0.5 / y2 ** 0.5}
        folded.update(bn_names)  # fitted against the dense outputs: their statistics already match
    stats["dense_passes"] = targets.passes


def reconstruct_pruned(model: nn.Module, dense: nn.Module, pruner, calib, *, layers: str = "consumers") -> dict:
    """:func:`reconstruct` for a model just compacted by ``pruner`` (a
    :class:`~hf_prune.engine.pruner.StructuredPruner`, whose graph says what each layer kept), with the
    defaults but ``layers``; returns the summary a method records: layers re-fitted, BatchNorms corrected,
    seconds and the mean relative layer-output error before and after."""
    stats = reconstruct(model, dense, calib, keep=kept_indices(pruner.graph, pruner.removed), layers=layers)
    errors = list(stats["layers"].values())

    def mean(key):
        return sum(float(e[key]) for e in errors) / len(errors) if errors else None

    return {"layers": len(errors), "batchnorms": len(stats["batchnorms"]), "seconds": round(stats["seconds"], 2),
            "mean_error_before": mean("before"), "mean_error_after": mean("after")}
