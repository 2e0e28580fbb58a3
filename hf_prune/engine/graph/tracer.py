"""Tracing: one forward pass under a dispatch mode that propagates channel labels through every op.

The tracer sees each ATen op with its real inputs and outputs, so rules work on concrete shapes:

* data movement (view, permute, cat, split, index, roll, pad, ...) is replayed on the labels;
* element-wise ops unite the labels of their inputs (residual adds, gating, layer scale);
* matmul / convolution / attention unite the contracted dimension of both operands and give the
  output the labels of the weight's rows; batched matmuls and attention treat each batch lane
  (a head) as one unit, so heads are pruned whole;
* normalisations unite their affine parameters with the normalised channels and are recorded so
  masks can keep their statistics exact;
* anything unknown pins (forbids pruning of) the labels it touches instead of guessing.

The result is a :class:`Trace`: the union-find, the labels of every parameter and buffer, and the
records needed for MACs, heads and normalisations. :mod:`hf_prune.engine.graph.groups` turns it into
prunable units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ...core.execution import caller_threads, eval_pass
from ...core.inputs import model_inputs
from .labels import Labels, Pins, UnionFind, compress, reshape_plane, varying_dims, zeros_plane
from .shape_only import HEAVY, NeedsValues, ShapeOnly, op_name, tensors_of

aten = torch.ops.aten

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "heads")
_ELEM_LIMIT = 1 << 22  # parameters larger than this never get per-element labels


@dataclass
class MacRecord:
    """MACs of one op: ``const * sum over an iteration space of prod(keep(factor))``."""

    module: str
    op: str
    shape: tuple
    const: int
    factors: list
    reads_input: bool = False  # its input is one of the model's example inputs (a stem layer)


@dataclass
class LaneRecord:
    """An attention op: ``lanes`` labels each head (batch lanes of the attention)."""

    module: str | None
    lanes: torch.Tensor


@dataclass
class NormRecord:
    """A normalisation whose statistics run over channels (LayerNorm-like)."""

    module: str
    channels: torch.Tensor


@dataclass
class Trace:
    uf: UnionFind
    params: dict  # tensor name -> Labels (parameters and floating buffers)
    aliases: dict  # tensor name -> canonical name (tied parameters)
    pins: Pins
    macs: list
    lanes: list
    norms: list
    unknown: list  # (op, module) pairs that pinned labels
    output_shapes: list
    splits: list = field(default_factory=list)  # (module, element labels of the input) per split op
    # module name -> element labels of its first input and first output (None: no channel identity);
    # later unions may merge them, so resolve with uf.find once the graph is built
    watched: dict = field(default_factory=dict)


_CREATION = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "empty", "zeros", "ones", "full", "arange", "scalar_tensor",
    "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride", "empty_strided", "randn", "rand",
    "linspace", "eye", "lift_fresh_copy", "bernoulli", "randint", "is_nonzero", "equal", "eq", "ne",
    "lt", "le", "gt", "ge", "argmax", "argmin", "isnan", "isinf", "logical_not", "logical_and",
    "logical_or", "ones_like", "tril", "triu", "_assert_async", "_assert_tensor_metadata",
    "resize_", "set_", "record_stream", "_unsafe_index",
}
_IDENTITY = {"_to_copy", "to", "clone", "alias", "detach", "lift_fresh", "contiguous", "_copy_from",
             "dropout", "native_dropout", "feature_dropout", "_pin_memory", "type_as"}
_RESHAPE = {"view", "_unsafe_view", "_reshape_alias", "reshape"}
_MOVE = {
    "permute", "transpose", "t", "expand", "squeeze", "unsqueeze", "select", "slice", "cat", "stack",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "index", "index_select", "gather",
    "roll", "flip", "repeat", "constant_pad_nd", "unfold", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "movedim", "repeat_interleave", "diagonal", "expand_as", "flatten",
    "unflatten", "tensor_split", "hsplit", "vsplit", "swapaxes", "view_as", "_unsafe_split",
    "unsafe_split", "unsafe_split_with_sizes", "alias_copy", "permute_copy", "view_copy",
    "transpose_copy", "t_copy", "expand_copy", "slice_copy", "select_copy", "split_copy",
    "unsqueeze_copy", "squeeze_copy", "unbind_copy",
}
_POINTWISE_EXTRA = {"hardswish", "hardswish_", "gelu_", "copy_", "mish", "mish_", "softplus",
                    "relu6", "hardsigmoid_", "lerp", "addcmul", "addcdiv", "logit", "elu_",
                    "leaky_relu_", "sigmoid_", "tanh_", "masked_fill_", "clamp_", "where"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
           "logsumexp", "prod", "norm", "linalg_vector_norm", "nansum", "nanmean"}
_DIMWISE = {"_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "_safe_softmax"}
_SPATIAL = {"max_pool2d_with_indices", "max_pool2d", "max_pool1d", "max_pool3d",
            "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
            "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "adaptive_max_pool2d",
            "adaptive_max_pool1d", "upsample_nearest2d", "upsample_bilinear2d",
            "_upsample_bilinear2d_aa", "upsample_bicubic2d", "_upsample_nearest_exact2d",
            "upsample_nearest1d", "reflection_pad2d", "replication_pad2d", "reflection_pad1d",
            "replication_pad1d", "lp_pool2d", "fractional_max_pool2d"}
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_fused_attention_overrideable", "scaled_dot_product_attention"}
_BATCH_NORM = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm",
               "batch_norm"}


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _fit(plane: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """Left-pad a plane with size-1 dims so it broadcasts against a tensor of rank ``ndim``."""
    if plane is None:
        return None
    while plane.dim() < ndim:
        plane = plane.unsqueeze(0)
    return plane


def _along(vec: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A 1-D label vector placed along ``axis`` of a rank-``ndim`` plane."""
    shape = [1] * ndim
    shape[axis] = vec.numel()
    return vec.reshape(shape)


class Tracer(ShapeOnly):
    """Runs one forward pass and propagates labels; see the module docstring.

    With ``values=False`` the model's matmuls and convolutions are not computed (see
    :mod:`hf_prune.engine.graph.shape_only`): the labels depend on shapes and indices only.
    """

    def __init__(self, model: nn.Module, values: bool = False):
        super().__init__(values)
        self.model = model
        self.uf = UnionFind()
        self.pins = Pins()
        self.table: dict[int, tuple[torch.Tensor, Labels]] = {}
        self.params: dict[str, Labels] = {}
        self.aliases: dict[str, str] = {}
        self.param_owner: dict[int, str] = {}
        self.macs: list[MacRecord] = []
        self.lanes: list[LaneRecord] = []
        self.norms: list[NormRecord] = []
        self.unknown: list[tuple[str, str]] = []
        self.splits: list[tuple[str, torch.Tensor]] = []
        self.stack: list[str] = []
        self.input_ids: set[int] = set()
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self._register_parameters()

    # ------------------------------------------------------------------ registration
    def _register_parameters(self) -> None:
        mixing_weights = set()
        for m in self.model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
                mixing_weights.add(id(m.weight))
        named = list(self.model.named_parameters(remove_duplicate=False))
        # Per-channel buffers (running statistics) follow their channels; larger float buffers
        # (attention masks, cached tables) are constants without channel identity.
        named += [(n, b) for n, b in self.model.named_buffers(remove_duplicate=False)
                  if _is_float(b) and b.dim() == 1]
        for name, t in named:
            if id(t) in self.table:
                self.aliases[name] = self.table[id(t)][1].source
                continue
            if t.numel() == 1:
                # A scalar (learnable affine, temperature) scales every channel alike: it has no
                # channel to lose, and labelling it would couple every channel it touches.
                continue
            dims = [None if n == 1 else _along(self.uf.fresh(n), t.dim(), d)
                    for d, n in enumerate(t.shape)]
            if t.dim() == 1:
                elem = dims[0] if dims[0] is not None else self.uf.fresh(1)
            elif id(t) in mixing_weights or t.numel() > _ELEM_LIMIT:
                elem = None
            else:
                elem = self.uf.fresh(t.numel()).reshape(t.shape) if t.numel() else None
            labels = Labels(elem, dims, name)
            self.params[name] = labels
            self.aliases[name] = name
            self.param_owner[id(t)] = name.rpartition(".")[0]
            self.table[id(t)] = (t, labels)

    def label_inputs(self, tensors) -> None:
        """Example inputs get fresh pinned labels: their channels are the model's contract."""
        for t in tensors:
            if _is_float(t):
                self.input_ids.add(id(t))
                lab = self.uf.fresh(t.numel()).reshape(t.shape)
                self.pins.add(lab, "model input")
                self._set(t, Labels(lab))

    def pin_outputs(self, tensors) -> None:
        for t in tensors:
            lab = self._get(t)
            if lab is not None:
                for p in lab.planes():
                    self.pins.add(p, "model output")

    # ------------------------------------------------------------------ label table
    def _get(self, t) -> Labels | None:
        hit = self.table.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def _canon(self, plane):
        return None if plane is None else compress(self.uf.find(compress(plane)))

    def _set(self, t: torch.Tensor, labels: Labels) -> None:
        planes = [self._canon(p) for p in labels.planes()]
        for p in planes:
            if p is not None and p.dim() != t.dim():
                raise RuntimeError(f"label rank {p.dim()} != tensor rank {t.dim()}")
        self.table[id(t)] = (t, Labels.from_planes(planes, labels))

    def _act(self, t) -> torch.Tensor | None:
        """Element labels of ``t`` (None when it has no channel identity)."""
        lab = self._get(t)
        if lab is None:
            return None
        if lab.elem is None and lab.is_param:
            # A big weight used element-wise together with activations: we cannot tell which of
            # its slices go with which channel, so it stays whole.
            for p in lab.dims:
                self.pins.add(p, f"weight {lab.source} used element-wise")
        return lab.elem

    def _is_input(self, t) -> bool:
        return id(t) in self.input_ids or id(getattr(t, "_base", None)) in self.input_ids

    def owner(self) -> str:
        return self.stack[-1] if self.stack else ""

    def head_owner(self) -> str | None:
        for name in reversed(self.stack):
            mod = self.modules.get(name)
            if mod is not None and any(isinstance(getattr(mod, a, None), int) for a in HEAD_COUNT_ATTRS):
                return name
        return None

    def merge(self, planes: list, ndim: int) -> torch.Tensor | None:
        """Unite planes elementwise (after broadcasting) and return the merged plane."""
        planes = [_fit(p, ndim) for p in planes if p is not None]
        if not planes:
            return None
        rep = planes[0]
        for p in planes[1:]:
            rep = torch.maximum(*torch.broadcast_tensors(rep, p))
        for p in planes:
            self.uf.union(rep, p)
        return self.uf.find(rep)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in HEAVY or name in _SDPA:
            with caller_threads():
                out = self.run_op(func, name, args, kwargs)
        else:
            out = self.run_op(func, name, args, kwargs)
        try:
            self._propagate(func, name, args, kwargs, out)
        except Exception as exc:  # an op we could not follow: forbid pruning what it touched
            self._unknown(name, args, kwargs, out, repr(exc))
        return out

    def _propagate(self, func, name, args, kwargs, out):
        if name in _CREATION:
            return
        inputs = [t for t in tensors_of((args, kwargs)) if self._get(t) is not None]
        if not inputs:
            return
        if name in _IDENTITY:
            src = self._get(args[0])
            if src is not None and isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(args[0].shape):
                self._set(out, src)
            return
        if name in _RESHAPE or name in _MOVE:
            return self._move(func, name, args, kwargs, out)
        if torch.Tag.pointwise in func.tags or name in _POINTWISE_EXTRA:
            return self._pointwise(args, kwargs, out)
        rule = _RULES.get(name)
        if rule is None:
            if name in _SDPA:
                rule = Tracer._sdpa
            elif name in _BATCH_NORM:
                rule = Tracer._batch_norm
        if rule is not None:
            return rule(self, args, kwargs, out)
        if name in _REDUCE and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            return self._reduce(name, args, kwargs, out)
        if name in ("max", "min", "maximum", "minimum"):
            return self._pointwise(args, kwargs, out)
        if name in _DIMWISE:
            return self._dimwise(args, out)
        if name in _SPATIAL:
            return self._spatial(args, out)
        self._unknown(name, args, kwargs, out, "no rule")

    def _unknown(self, name, args, kwargs, out, why):
        module = self.owner()
        self.unknown.append((name, module, why))
        first = None
        for t in tensors_of((args, kwargs)):
            lab = self._get(t)
            if lab is None:
                continue
            first = first or (t, lab)
            for p in lab.planes():
                self.pins.add(p, f"op {name} in {module or 'model'} ({why})")
        if first is not None and isinstance(out, torch.Tensor) and out.shape == first[0].shape:
            try:
                self._set(out, first[1])
            except RuntimeError:
                pass

    # ------------------------------------------------------------------ rule families
    def _move(self, func, name, args, kwargs, out):
        if self._get(args[0]) is not None and self._get(args[0]).elem is not None and (
                name in _SPLITS or _partial_channel_slice(name, args, self._get(args[0]).elem)):
            # Sizes given to a split (or slice bounds) may be stored in the module; the repair loop
            # can pin these.
            self.splits.append((self.stack[-1] if self.stack else "", self._get(args[0]).elem))
        perm = _permutation(name, args)
        if perm is not None and isinstance(out, torch.Tensor) and self._get(args[0]) is not None:
            # Axes only change places: permute the (already canonical) planes instead of replaying
            # the op on full-size expanded label tensors (a linear's weight.t() is in every layer).
            lab = self._get(args[0])
            planes = [None if p is None else p.permute(perm) for p in lab.planes()]
            self.table[id(out)] = (out, Labels.from_planes(planes, lab))
            return
        if name in _RESHAPE and isinstance(out, torch.Tensor) and self._get(args[0]) is not None:
            lab = self._get(args[0])
            planes = [None if p is None else reshape_plane(p.expand(args[0].shape) if p.dim() != args[0].dim() else p,
                                                           args[0].shape, out.shape)
                      for p in lab.planes()]
            self._set(out, Labels.from_planes(planes, lab))
            return
        labs = [(t, self._get(t)) for t in tensors_of((args, kwargs)) if _is_float(t)]
        labelled = [lab for _, lab in labs if lab is not None]
        param_mode = (len(labelled) == len(labs) and all(l.is_param for l in labelled)
                      and len({len(l.dims) for l in labelled}) == 1)
        n_planes = 1 + len(labelled[0].dims) if param_mode else 1

        def substitute(i):
            def sub(x):
                if not _is_float(x):
                    return x
                lab = self._get(x)
                if param_mode:
                    plane = lab.planes()[i]
                else:
                    plane = self._act(x) if lab is not None else None
                if plane is None:
                    plane = zeros_plane(x.dim())
                return plane.expand(x.shape)
            return sub

        results = []
        for i in range(n_planes):
            if param_mode and all(l.planes()[i] is None for l in labelled):
                results.append(None)
                continue
            a, k = tree_map(substitute(i), (args, kwargs))
            if name in _RESHAPE:
                results.append(a[0].reshape(out.shape))
            else:
                results.append(func(*a, **k))
        outs = tensors_of(out)
        per_plane = [(tensors_of(r) if r is not None else [None] * len(outs)) for r in results]
        source = labelled[0].source if param_mode else None
        for j, t in enumerate(outs):
            planes = [pp[j] for pp in per_plane]
            if not _is_float(t):
                continue
            if param_mode:
                self._set(t, Labels(planes[0], planes[1:], source))
            elif planes[0] is not None:
                self._set(t, Labels(planes[0]))

    def _pointwise(self, args, kwargs, out):
        outs = [t for t in tensors_of(out) if _is_float(t)]
        if not outs:
            return
        target = outs[0]
        ins = [t for t in tensors_of((args, kwargs)) if _is_float(t) and self._get(t) is not None]
        labs = [self._get(t) for t in ins]
        if not labs:
            return
        if all(l.is_param and l.elem is None for l in labs):
            # Arithmetic on weights alone (weight standardisation, scaling): keep the weight's dims.
            first = labs[0]
            if all(p is None or p.dim() == target.dim() for p in first.dims):
                self._set(target, Labels(None, list(first.dims), first.source))
            return
        merged = self.merge([self._act(t) for t in ins], target.dim())
        if merged is not None:
            self._set(target, Labels(merged))

    def _reduce(self, name, args, kwargs, out):
        x = args[0]
        lab = self._get(x)
        outs = [t for t in tensors_of(out) if _is_float(t)]
        if lab is None or not outs:
            return
        ndim = x.dim()
        dim_pos = 2 if name in ("norm", "linalg_vector_norm") else 1
        dims = args[dim_pos] if len(args) > dim_pos and not isinstance(args[dim_pos], bool) else kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(ndim))
        dims = sorted({d % ndim for d in dims}) if ndim else []
        keepdim = bool(kwargs.get("keepdim", False))
        for a in args[dim_pos + 1:]:
            if isinstance(a, bool):
                keepdim = a
        planes = []
        for p in lab.planes():
            if p is None:
                planes.append(None)
                continue
            reduced = varying_dims(p) & set(dims)
            if reduced:
                self._channel_reduction(p, reduced, name)
                p = zeros_plane(ndim)
            for d in dims:
                p = p.narrow(d, 0, 1)
            if not keepdim:
                for d in reversed(dims):
                    p = p.squeeze(d)
            planes.append(p)
        for t in outs[:1]:
            if lab.is_param:
                self._set(t, Labels(planes[0], planes[1:], lab.source))
            elif planes[0] is not None:
                self._set(t, Labels(planes[0]))

    def _channel_reduction(self, plane, dims, op):
        """A statistic over channels: exact under masks only inside a normalisation we know."""
        module = self.owner()
        mod = self.modules.get(module)
        if mod is not None and _looks_like_norm(mod):
            d = max(dims)
            chans = plane.movedim(d, -1).reshape(-1, plane.shape[d])[0]
            self.norms.append(NormRecord(module, chans.clone()))
        else:
            self.pins.add(plane, f"{op} over channels in {module or 'model'}")

    def _dimwise(self, args, out):
        x, dim = args[0], args[1]
        plane = self._act(x)
        if plane is None or not isinstance(out, torch.Tensor):
            return
        if plane.shape[dim % x.dim()] > 1:
            self.pins.add(plane, f"softmax-like op over channels in {self.owner() or 'model'}")
        self._set(out, Labels(plane))

    def _spatial(self, args, out):
        x = args[0]
        plane = self._act(x)
        outs = tensors_of(out)
        if plane is None or not outs or not _is_float(outs[0]):
            return
        if varying_dims(plane) & set(range(2, plane.dim())):
            self.pins.add(plane, f"spatial op over labelled positions in {self.owner() or 'model'}")
            return
        self._set(outs[0], Labels(plane))

    # ------------------------------------------------------------------ matmul family
    def _operand_planes(self, t) -> list:
        lab = self._get(t)
        if lab is None:
            return []
        if lab.is_param:
            return [p for p in lab.dims if p is not None]
        return [lab.elem] if lab.elem is not None else []

    def _matmul(self, a, b, out, bias=None, op="mm"):
        nb = a.dim() - 2
        n, k = a.shape[-2], a.shape[-1]
        m = b.shape[-1]
        batch = tuple(out.shape[:nb])
        rank = nb + 3  # iteration space: *batch, n, m, k
        N_, M_, K_ = nb, nb + 1, nb + 2
        planes = []
        for p in self._operand_planes(a):
            planes.append(("a", _fit(p, nb + 2).unsqueeze(M_)))
        for p in self._operand_planes(b):
            planes.append(("b", _fit(p, nb + 2).transpose(-1, -2).unsqueeze(N_)))
        batch_axes = set(range(nb))
        lanes, kplanes, rows, cols = [], [], [], []
        for side, p in planes:
            v = varying_dims(p)
            if v & batch_axes:
                lanes.append(p)
            if K_ in v and not v & batch_axes:  # inside a lane the lane union covers it
                kplanes.append((side, p))
            rest = v - batch_axes
            if side == "a" and N_ in rest and rest <= {N_}:
                rows.append(p)
            if side == "b" and M_ in rest and rest <= {M_}:
                cols.append(p)
        factors = []
        lane_rep = None
        if lanes:
            L = math.prod(batch)
            lane_rep = self.uf.fresh(L).reshape(batch + (1, 1, 1))
            # Every label inside a lane joins it, including planes that no longer vary along the
            # batch axes (e.g. scores whose lanes an attention mask already merged).
            for _, p in planes:
                self.uf.union(lane_rep, p)
            factors.append(lane_rep)
            self.lanes.append(LaneRecord(self.head_owner(), lane_rep.reshape(-1)))
        if kplanes:
            k_rep = _along(self.uf.fresh(k), rank, K_)
            for _, p in kplanes:
                self.uf.union(k_rep, p)
            if len({s for s, _ in kplanes}) == 1 and not lanes:
                # Only one side knows the contracted channels: the other side has no identity to
                # follow, so those channels cannot be removed.
                self.pins.add(k_rep, f"matmul in {self.owner() or 'model'} with an unlabelled operand")
            factors.append(k_rep)
        if rows:
            factors.append(rows[0])
        if cols:
            factors.append(cols[0])
        self.macs.append(MacRecord(self.owner(), op, batch + (n, m, k), 1, factors,
                                   self._is_input(a) or self._is_input(b)))
        out_planes = ([lane_rep] if lane_rep is not None else []) + rows + cols
        out_planes = [p.narrow(K_, 0, 1).squeeze(K_) for p in out_planes]
        if bias is not None:
            bp = self._act(bias)
            if bp is not None:
                out_planes.append(_fit(bp, nb + 2))
        merged = self.merge(out_planes, nb + 2)
        if merged is not None:
            self._set(out, Labels(merged))

    def _mm(self, args, kwargs, out):
        self._matmul(args[0], args[1], out, op="mm")

    def _addmm(self, args, kwargs, out):
        self._matmul(args[1], args[2], out, bias=args[0], op="mm")

    def _bmm(self, args, kwargs, out):
        self._matmul(args[0], args[1], out, op="bmm")

    def _baddbmm(self, args, kwargs, out):
        self._matmul(args[1], args[2], out, bias=args[0], op="bmm")

    def _linear(self, args, kwargs, out):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        wt = w.t()
        lab = self._get(w)
        if lab is not None and lab.is_param:
            self.table[id(wt)] = (wt, Labels(None, [None if p is None else p.transpose(0, 1) for p in lab.dims], lab.source))
        x2 = x.reshape(-1, x.shape[-1])
        if self._get(x) is not None:
            self._set(x2, Labels(self._act(x).expand(x.shape).reshape(-1, x.shape[-1])))
        o2 = out.reshape(-1, out.shape[-1])
        self._matmul(x2, wt, o2, bias=bias, op="mm")
        res = self._get(o2)
        if res is not None:
            self._set(out, Labels(res.elem.expand(o2.shape).reshape(out.shape)))

    # ------------------------------------------------------------------ convolution
    def _convolution(self, args, kwargs, out):
        x, w, bias = args[0], args[1], args[2]
        transposed, groups = bool(args[6]), int(args[8])
        wl = self._get(w)
        xp = self._act(x)
        nd = x.dim()
        if wl is None or not wl.is_param:
            self.pins.add(xp, f"convolution with a computed weight in {self.owner() or 'model'}")
            return
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        C, O = x.shape[1], out.shape[1]
        w_in, w_out = wl.dims[in_dim], wl.dims[out_dim]
        factors_in, factors_out = None, None
        if groups == 1:
            if w_in is not None:
                if xp is None:
                    self.pins.add(w_in, f"convolution input without channel identity in {self.owner()}")
                else:
                    self.uf.union(_along(w_in.reshape(-1), nd, 1), xp)
                factors_in = w_in.reshape(-1)
            out_plane = None if w_out is None else _along(w_out.reshape(-1), nd, 1)
            factors_out = None if w_out is None else w_out.reshape(-1)
        else:
            grp = self.uf.fresh(groups)
            if xp is not None:
                self.uf.union(_along(grp.repeat_interleave(C // groups), nd, 1), xp)
            if transposed:
                if w_in is not None:
                    self.uf.union(grp.repeat_interleave(C // groups), w_in.reshape(-1))
                out_vec = grp.repeat_interleave(O // groups)
            else:
                if w_out is not None:
                    self.uf.union(grp.repeat_interleave(O // groups), w_out.reshape(-1))
                out_vec = grp.repeat_interleave(O // groups) if w_out is None else w_out.reshape(-1)
            out_plane = _along(out_vec, nd, 1)
            factors_out = out_vec if not transposed else grp.repeat_interleave(C // groups)
        kernel = tuple(w.shape[2:])
        if transposed:
            space = (x.shape[0], C) + tuple(x.shape[2:]) + (w.shape[1],) + kernel
            first = factors_out if groups > 1 else factors_in
            facs = [] if first is None else [_along(first, len(space), 1)]
            if groups == 1 and w_out is not None:
                facs.append(_along(w_out.reshape(-1), len(space), nd))
        else:
            space = (out.shape[0], O) + tuple(out.shape[2:]) + (w.shape[1],) + kernel
            facs = []
            if factors_out is not None:
                facs.append(_along(factors_out, len(space), 1))
            if factors_in is not None:
                facs.append(_along(factors_in, len(space), nd))
        self.macs.append(MacRecord(self.owner(), "conv", space, 1, facs, self._is_input(x)))
        if bias is not None and out_plane is not None:
            bp = self._act(bias)
            if bp is not None:
                out_plane = self.merge([out_plane, _along(bp.reshape(-1), nd, 1)], nd)
        if out_plane is not None:
            self._set(out, Labels(out_plane))

    # ------------------------------------------------------------------ attention
    def _sdpa(self, args, kwargs, out):
        q, k, v = args[0], args[1], args[2]
        mask = kwargs.get("attn_mask")
        if mask is None and len(args) > 3 and isinstance(args[3], torch.Tensor):
            mask = args[3]
        o = out[0] if isinstance(out, (tuple, list)) else out
        nb = q.dim() - 2
        batch = tuple(o.shape[:nb])
        lane_rep = self.uf.fresh(math.prod(batch)).reshape(batch + (1, 1))
        # Each lane (head) is one unit: that covers the q.k contraction inside the head too.
        for t in (q, k, v, mask):
            p = self._act(t) if t is not None else None
            if p is not None:
                self.uf.union(lane_rep, _fit(p, nb + 2))
        self.lanes.append(LaneRecord(self.head_owner(), lane_rep.reshape(-1)))
        L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        self.macs.append(MacRecord(self.owner(), "attention", batch, L * S * (E + Ev), [lane_rep.reshape(batch)]))
        vp = self._act(v)
        planes = [lane_rep] + ([_fit(vp, nb + 2).narrow(nb, 0, 1)] if vp is not None else [])
        merged = self.merge(planes, nb + 2)
        self._set(o, Labels(merged))

    # ------------------------------------------------------------------ normalisation
    def _norm_params(self, tensors, x, axis):
        xp = self._act(x)
        for t in tensors:
            if isinstance(t, torch.Tensor) and self._get(t) is not None:
                tp = self._act(t)
                if tp is not None and xp is not None:
                    self.uf.union(_along(tp.reshape(-1), x.dim(), axis), xp)
        return xp

    def _record_norm(self, weight, plane, axis):
        module = self.param_owner.get(id(weight)) if weight is not None else None
        module = module if module is not None else self.owner()
        chans = plane.movedim(axis, -1).reshape(-1, plane.shape[axis])[0]
        self.norms.append(NormRecord(module, chans.clone()))

    def _layer_norm(self, args, kwargs, out):
        x, shape, weight, bias = args[0], args[1], args[2], args[3] if len(args) > 3 else None
        xp = self._norm_params([weight, bias], x, x.dim() - 1)
        if xp is None:
            return
        if len(shape) > 1:
            if varying_dims(xp) & set(range(x.dim() - len(shape), x.dim())):
                self.pins.add(xp, f"layer norm over several labelled dims in {self.owner()}")
        elif xp.shape[-1] > 1:
            self._record_norm(weight, self.uf.find(xp), x.dim() - 1)
        self._set(out[0], Labels(xp))

    def _batch_norm(self, args, kwargs, out):
        x = args[0]
        xp = self._norm_params(args[1:5], x, 1)
        o = out[0] if isinstance(out, (tuple, list)) else out
        if xp is not None:
            self._set(o, Labels(xp))

    def _group_norm(self, args, kwargs, out):
        x, weight, bias, groups = args[0], args[1], args[2], int(args[6])
        xp = self._norm_params([weight, bias], x, 1)
        if xp is None:
            return
        C = x.shape[1]
        if groups == 1:
            if xp.shape[1] > 1:
                self._record_norm(weight, self.uf.find(xp), 1)
        elif groups > 1:
            grp = self.uf.fresh(groups).repeat_interleave(C // groups)
            self.uf.union(_along(grp, x.dim(), 1), xp)
        self._set(out[0], Labels(self.uf.find(xp)))

    def _embedding(self, args, kwargs, out):
        wl = self._get(args[0])
        if wl is None or not wl.is_param or wl.dims[1] is None:
            return
        self._set(out, Labels(_along(wl.dims[1].reshape(-1), out.dim(), out.dim() - 1)))


def _looks_like_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and (hasattr(module, "eps") or hasattr(module, "variance_epsilon"))


_SPLITS = {"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "_unsafe_split",
           "split_copy", "split_with_sizes_copy", "tensor_split"}


def _partial_channel_slice(name: str, args, plane: torch.Tensor) -> bool:
    """A ``slice`` that keeps part of a dimension carrying channel labels (RexNet: ``x[:, :in_chs]``)."""
    if name not in ("slice", "slice_copy") or not isinstance(args[0], torch.Tensor):
        return False
    x = args[0]
    dim = (args[1] if len(args) > 1 else 0) % max(x.dim(), 1)
    size = x.shape[dim]
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else size
    start, end = (v + size if v < 0 else v for v in (start, end))
    varies = plane.dim() == x.dim() and plane.shape[dim] > 1
    return varies and (start > 0 or end < size)

_RULES = {
    "mm": Tracer._mm,
    "addmm": Tracer._addmm,
    "bmm": Tracer._bmm,
    "baddbmm": Tracer._baddbmm,
    "linear": Tracer._linear,
    "convolution": Tracer._convolution,
    "_convolution": Tracer._convolution,
    "native_layer_norm": Tracer._layer_norm,
    "native_group_norm": Tracer._group_norm,
    "embedding": Tracer._embedding,
}


def trace(model: nn.Module, example_inputs, watch=()) -> Trace:
    """Trace ``model`` on ``example_inputs`` (tensor, tuple of tensors, or dict of keyword args).

    ``watch`` names modules whose first input and output tensors' element labels go into
    ``Trace.watched``: which channels flow in and out of them.

    The pass skips the heavy ops' compute; a model whose shapes or control flow depend on those
    values (:class:`NeedsValues`), or that fails in that pass, is traced again with real compute,
    so what the trace sees, and any error it raises, are those of a real forward.
    """
    try:
        return _trace(model, example_inputs, values=False, watch=watch)
    except (NeedsValues, Exception):
        return _trace(model, example_inputs, values=True, watch=watch)


def _trace(model: nn.Module, example_inputs, values: bool, watch=()) -> Trace:
    tracer = Tracer(model, values)
    args, kwargs = model_inputs(model, example_inputs)
    tracer.label_inputs(tensors_of((args, kwargs)))

    def push(module, _inputs):
        tracer.stack.append(tracer.module_names.get(id(module), ""))

    def pop(module, _inputs, _output):
        if tracer.stack:
            tracer.stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(push),
             nn.modules.module.register_module_forward_hook(pop, always_call=True)]
    hooks += _slow_path_hooks(model)
    seen: dict = {}
    hooks += _watch_hooks(model, watch, tracer, seen)
    try:
        with torch.no_grad(), eval_pass(model), tracer:
            output = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    outs = _output_tensors(output)
    tracer.pin_outputs(outs)
    watched = {name: seen.get(name, (None, None)) for name in watch}
    return Trace(tracer.uf, tracer.params, tracer.aliases, tracer.pins, tracer.macs, tracer.lanes,
                 tracer.norms, tracer.unknown, [tuple(t.shape) for t in outs], tracer.splits, watched)


def _watch_hooks(model: nn.Module, watch, tracer: "Tracer", seen: dict) -> list:
    """Record the element labels of the first input and output tensor of every module in ``watch``."""
    def labels(tree):
        found = tensors_of(tree)
        lab = tracer._get(found[0]) if found else None
        return None if lab is None else lab.elem

    hooks = []
    for name in watch:
        module = model.get_submodule(name)

        def pre(_m, args, kwargs, name=name):
            seen[name] = (labels((args, kwargs)), None)

        def post(_m, _args, out, name=name):
            seen[name] = (seen.get(name, (None, None))[0], labels(out))

        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(post))
    return hooks


def _permutation(name: str, args) -> tuple | None:
    """The axis permutation done by a transpose-like op, or None for any other op."""
    if name not in ("t", "transpose", "permute") or not isinstance(args[0], torch.Tensor):
        return None
    ndim = args[0].dim()
    if ndim == 0:
        return None
    order = list(range(ndim))
    if name == "t":
        return tuple(reversed(order)) if ndim == 2 else tuple(order)
    if name == "transpose":
        a, b = (d % ndim for d in args[1:3])
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    return tuple(d % ndim for d in args[1])


def _slow_path_hooks(model: nn.Module) -> list:
    """Make nn.MultiheadAttention take its decomposed path while traced.

    In inference it calls one fused kernel (``_native_multi_head_attention``) whose heads the label
    rules cannot see; with gradients enabled it runs projections, reshapes and attention as
    separate ops. Only the trace sees this: the outputs are the same.
    """
    hooks, modes = [], []

    def enter(module, _inputs):
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(True)

    def leave(module, _inputs, _output):
        torch.set_grad_enabled(modes.pop())

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave, always_call=True))
    return hooks


def _output_tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # also transformers' ModelOutput
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        return []
    found = []
    for item in items:
        found.extend(_output_tensors(item))
    return [t for t in found if _is_float(t)]
