"""Running a model for its shapes only: the engine's cheap forward passes.

The trace and the check after a compaction need every op's output shape and layout, never the
values of the model's matmuls and convolutions, which are most of a forward's cost. Under
:class:`ShapeOnly` those ops are run on meta tensors (which validates their operands' shapes) and
return zeros of the right shape, strides and dtype; every other op runs for real on what it gets.

Values matter where they choose shapes, indices or control flow (``.item()``, ``nonzero``, ``topk``,
indexing with a computed index, ...). Outputs of skipped ops are *tainted*, and so is everything
computed from them; when such an op meets a tainted tensor the pass stops with
:class:`NeedsValues` and the caller runs it again with real compute, so the result is always that
of a real forward.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# The model's own compute: skipped under ShapeOnly; in a real pass run with the caller's threads.
HEAVY = {"mm", "addmm", "bmm", "baddbmm", "linear", "convolution", "_convolution", "mkldnn_convolution"}

# Ops whose outputs (shape, indices, or a Python value) depend on their inputs' values.
VALUE_OPS = {
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "argwhere", "masked_select",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "topk", "sort", "argsort", "msort",
    "kthvalue", "argmax", "argmin", "mode", "median", "nanmedian", "multinomial",
    "bincount", "histc", "searchsorted", "bucketize", "_assert_async", "allclose",
}


class NeedsValues(BaseException):
    """A shape-only pass reached an op whose result depends on values; run the pass for real.

    A BaseException so that a model's own ``except Exception`` cannot swallow it and carry on.
    """


def op_name(func) -> str:
    return func.overloadpacket.__name__


def tensors_of(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class ShapeOnly(TorchDispatchMode):
    """Dispatch mode that skips the heavy ops' compute; see the module docstring.

    ``values=True`` computes everything (the fallback), so subclasses have one code path.
    """

    def __init__(self, values: bool = False):
        super().__init__()
        self.values = values
        self.tainted: dict[int, torch.Tensor] = {}

    def run_op(self, func, name: str, args, kwargs):
        """Run one op as this pass does: for real, or for its shape when it is heavy."""
        if self.values:
            return func(*args, **kwargs)
        if name in HEAVY and "out" not in kwargs:
            out = _zeros_for(func, args, kwargs)
        else:
            hit = [t for t in tensors_of((args, kwargs)) if self.tainted.get(id(t)) is t]
            if hit and _reads_values(func, name, hit):
                raise NeedsValues(name)
            out = func(*args, **kwargs)
            if not hit:
                return out
        for t in tensors_of(out):
            self.tainted[id(t)] = t
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.run_op(func, op_name(func), args, kwargs or {})


def _reads_values(func, name: str, tainted: list) -> bool:
    if name in ("max", "min"):  # the overloads with indices
        return func._overloadname not in ("default", "other", "out", "unary_out")
    if name in VALUE_OPS:
        return True
    # An integer or boolean tensor computed from skipped values, used other than element-wise, is an
    # index or a mask: where it points depends on those values.
    return torch.Tag.pointwise not in func.tags and any(not t.is_floating_point() for t in tainted)


def _zeros_for(func, args, kwargs):
    device = tensors_of((args, kwargs))[0].device
    shape = _matmul_shape(op_name(func), args)
    if shape is not None:
        return torch.zeros(shape, dtype=args[-1].dtype, device=device)
    meta_args, meta_kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
    _check_bias(func, args)
    meta_out = func(*meta_args, **meta_kwargs)  # raises on operands whose shapes do not fit
    layout = _conv_layout(func, args)
    if layout is not None:
        return torch.empty(meta_out.shape, dtype=meta_out.dtype, device=device, memory_format=layout).zero_()
    return tree_map(lambda m: torch.zeros_like(m, device=device) if isinstance(m, torch.Tensor) else m, meta_out)


def _conv_layout(func, args):
    """The memory format the real convolution gives its output (channels-last inputs keep it on CPU).

    The meta kernel cannot know the backend and answers contiguous; torch's own fake tensors ask
    the same two functions used here. Strides matter: later views and kernels branch on them.
    """
    if op_name(func) not in ("convolution", "_convolution") or len(args) < 9 or args[1].dim() not in (4, 5):
        return None
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    try:
        backend = torch._C._select_conv_backend(x, weight, bias=bias, stride=stride, padding=padding,
                                                dilation=dilation, transposed=transposed,
                                                output_padding=output_padding, groups=groups)
        return torch._C._conv_determine_backend_memory_format(x, weight, backend)
    except (AttributeError, RuntimeError, TypeError):  # private helpers: a later torch may change them
        return None


def _matmul_shape(name: str, args) -> tuple | None:
    """Output shape of a (batched) matrix product, checked as the real kernel checks it.

    Torch's meta matmuls are Python decompositions (~2 ms each); these are a few comparisons. None
    sends anything unusual (mixed dtypes, extra arguments) to the meta kernel.
    """
    if name in ("mm", "bmm") and len(args) == 2:
        bias, (a, b) = None, args
    elif name in ("addmm", "baddbmm") and len(args) == 3:
        bias, a, b = args
    else:
        return None
    rank = 2 if name in ("mm", "addmm") else 3
    if not all(isinstance(t, torch.Tensor) for t in (a, b)) or a.dtype != b.dtype or (
            bias is not None and bias.dtype != a.dtype):
        return None
    if a.dim() != rank or b.dim() != rank or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        raise RuntimeError(f"{name}: operands of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    shape = tuple(a.shape[:-1]) + (b.shape[-1],)
    if bias is not None and torch.broadcast_shapes(bias.shape, shape) != shape:
        raise RuntimeError(f"{name}: bias of shape {tuple(bias.shape)} does not broadcast to {shape}")
    return shape


def _check_bias(func, args) -> None:
    """The meta convolution does not check its bias; the real one does."""
    if op_name(func) not in ("convolution", "_convolution") or len(args) < 3:
        return
    weight, bias = args[1], args[2]
    if bias is None:
        return
    transposed = len(args) > 6 and bool(args[6])
    groups = args[8] if len(args) > 8 and not isinstance(args[8], torch.Tensor) else 1
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if bias.numel() != out_channels:
        raise RuntimeError(f"convolution bias has {bias.numel()} elements, expected {out_channels} (weight "
                           f"{tuple(weight.shape)})")
