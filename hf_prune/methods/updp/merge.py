"""Exact re-parameterisation arithmetic for UPDP: affine convolutions, their composition, and the
module a merged block becomes.

Everything here is plain linear algebra on *affine* maps of NCHW tensors. A convolution, a
``nn.Linear`` applied to tokens or channels-last pixels, an eval-mode BatchNorm and a layer scale
are all :class:`ConvSpec` (a linear map on the channel axis is a 1x1 convolution). Arithmetic runs
in float64 and the result is cast back to the block's dtype.

Rules (each exact):

* ``fold_after(conv, a, c)``: a per-channel affine ``y -> a*y + c`` after a conv (BN in eval mode,
  layer scale) folds into that conv: ``W <- a W``, ``b <- a b + c``.
* ``fold_before(a, c, conv)``: a per-channel affine *before* a conv folds into it only when the conv
  reads no padding (pointwise / linear): ``W <- W a``, ``b <- b + W c``. Folding into a following
  *padded* conv is not exact at the borders and is refused.
* ``compose(c1, c2)``: ``c2 . c1`` is one conv with kernel ``k1 + (k2 - 1) s1``, stride ``s1 s2``,
  ``W[o, i, s1 u + v] = sum_m W2[o, m, u] W1[m, i, v]`` (a transposed convolution of the kernels) and
  ``b = b2 + sum_{m,u} W2[o, m, u] b1[m]``. Padding: if ``c2`` has none, the composite keeps ``c1``'s;
  if ``c2`` is padded, ``c1`` must be pointwise without padding, and the composite pads the input by
  ``s1 * p2``. That last case is exact only if the intermediate map was padded with ``c1``'s *bias*
  (what ``c1`` outputs on a zero input) rather than with zeros: the annealed blocks that need it
  (MobileNetV2) pad that way at lambda = 1 (see ``updp_blocks``).
* ``add_shortcut(conv, shortcut)``: a residual ``x`` (identity) or a projection shortcut (1x1 conv,
  BN folded) added to the output folds into the conv's kernel at the tap that reads input position
  ``stride * j`` (a Dirac kernel for the identity), when strides and output grids agree.
* Depthwise (grouped) kernels stay grouped when composed with nothing, and are expanded to dense
  only when composed with a dense conv; whether that is worth it is decided by MACs
  (:func:`plan_partition`), never assumed.

:class:`MergedBlock` is what a pruned block becomes: a short chain of convs (or linears for token
layouts), an optional shortcut (identity or projection) added to the chain's output, and an optional
activation. :meth:`MergedBlock.describe` gives a JSON description from which
:meth:`MergedBlock.from_description` rebuilds the module with uninitialised weights (for loaders: the
weights file then fills it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvSpec", "bn_affine", "fold_after", "fold_before", "compose", "compose_chain",
           "add_shortcut", "can_fold_shortcut", "plan_partition", "segment_macs", "tf_same_pads",
           "TFSameConv2d", "MergedBlock", "act_name", "make_act", "MergeError"]


class MergeError(ValueError):
    """A merge that would not be exact (geometry that cannot be composed)."""


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def tf_same_pads(size_hw, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding (left, right, top, bottom), as transformers' MobileNetV2 computes it."""
    pads = []
    for n, k, s, d in zip(size_hw, kernel, stride, dilation):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((total // 2 * d, (total - total // 2) * d))
    (top, bottom), (left, right) = pads
    return (left, right, top, bottom)


@dataclass
class ConvSpec:
    """An affine convolution on NCHW tensors: weight ``(O, I // groups, kh, kw)``, bias ``(O,)``.

    ``padding`` is ``(ph, pw)`` (symmetric, zeros) or ``"tf_same"`` (TensorFlow SAME, computed from
    the input size).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        self.stride = _pair(self.stride)
        self.dilation = _pair(self.dilation)
        if self.padding != "tf_same":
            self.padding = _pair(self.padding)
        if self.kernel_size == (1, 1):
            self.dilation = (1, 1)
            if self.padding == "tf_same":
                self.padding = (0, 0)  # SAME padding of a 1x1 kernel is always zero

    # ---- shape
    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def macs_per_output_pixel(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw

    # ---- construction
    @classmethod
    def from_module(cls, module: nn.Module, *, tf_same: bool = False, dtype=None) -> ConvSpec:
        """From an ``nn.Conv2d`` or an ``nn.Linear`` (a 1x1 conv on the channel axis)."""
        dtype = dtype or _work_dtype(module.weight.device)
        w = module.weight.detach().to(dtype)
        b = module.bias.detach().to(dtype) if module.bias is not None else torch.zeros(
            w.shape[0], dtype=dtype, device=w.device)
        if isinstance(module, nn.Linear):
            return cls(w[:, :, None, None].clone(), b.clone())
        if not isinstance(module, nn.Conv2d):
            raise MergeError(f"cannot merge a {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise MergeError(f"padding_mode={module.padding_mode!r} is not mergeable")
        if isinstance(module.padding, str):
            if module.padding == "valid":
                padding = (0, 0)
            else:
                raise MergeError("padding='same' convolutions are not supported")
        else:
            padding = module.padding
        return cls(w.clone(), b.clone(), module.stride, "tf_same" if tf_same else padding, module.dilation,
                   module.groups)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(O, I, kh, kw)`` kernel (block-diagonal expansion of groups)."""
        if self.groups == 1:
            return self.weight
        o, ig, kh, kw = self.weight.shape
        og = o // self.groups
        rows = torch.arange(o, device=self.weight.device)[:, None].expand(o, ig)
        cols = (rows // og) * ig + torch.arange(ig, device=self.weight.device)[None, :]
        dense = self.weight.new_zeros(o, ig * self.groups, kh, kw)
        dense[rows, cols] = self.weight
        return dense

    def to(self, dtype) -> ConvSpec:
        return replace(self, weight=self.weight.to(dtype), bias=self.bias.to(dtype))


def bn_affine(bn: nn.Module, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = a * x + c`` (per channel)."""
    ref = bn.running_mean
    dtype = dtype or _work_dtype(ref.device)
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().to(dtype)
    c = -mean * a
    if bn.bias is not None:
        c = c + bn.bias.detach().to(dtype)
    return a, c


def fold_after(conv: ConvSpec, scale: torch.Tensor | None, shift: torch.Tensor | None = None) -> ConvSpec:
    """``y -> scale * conv(x) + shift`` as one conv."""
    w, b = conv.weight, conv.bias
    if scale is not None:
        scale = scale.to(w.dtype)
        w = w * scale.view(-1, 1, 1, 1)
        b = b * scale
    if shift is not None:
        b = b + shift.to(w.dtype)
    return replace(conv, weight=w, bias=b)


def fold_before(scale: torch.Tensor | None, shift: torch.Tensor | None, conv: ConvSpec) -> ConvSpec:
    """``conv(scale * x + shift)`` as one conv; only for convs that read no padding."""
    if conv.padding != (0, 0):
        raise MergeError("an affine map before a padded convolution cannot be folded exactly (borders)")
    w = conv.dense_weight()
    b = conv.bias
    if shift is not None:
        b = b + torch.einsum("oikl,i->o", w, shift.to(w.dtype))
    if scale is not None:
        w = w * scale.to(w.dtype).view(1, -1, 1, 1)
    return replace(conv, weight=w, bias=b, groups=1)


def composable(c1: ConvSpec, c2: ConvSpec) -> bool:
    """Whether ``c2 . c1`` is one convolution exactly (given bias-valued padding where documented)."""
    if c1.out_channels != c2.in_channels:
        return False
    if c2.padding == "tf_same":
        return c1.pointwise and c1.stride == (1, 1)
    if c2.padding != (0, 0) and not c1.pointwise:
        return False
    if c1.kernel_size != (1, 1) and c2.kernel_size != (1, 1):
        return c1.dilation == (1, 1) and c2.dilation == (1, 1)
    return True


def compose(c1: ConvSpec, c2: ConvSpec) -> ConvSpec:
    """The single convolution equal to ``c2(c1(x))`` (see the module docstring for padding)."""
    if not composable(c1, c2):
        raise MergeError(f"cannot compose conv {c1.kernel_size}/s{c1.stride}/p{c1.padding} with "
                         f"conv {c2.kernel_size}/s{c2.stride}/p{c2.padding} exactly")
    w1, w2 = c1.weight, c2.weight
    # depthwise . depthwise stays depthwise
    if c1.depthwise and c2.depthwise and c1.out_channels == c2.in_channels:
        ch = c1.out_channels
        if c1.kernel_size == (1, 1) or c2.kernel_size == (1, 1):
            k = w2 * w1 if c1.kernel_size == (1, 1) else w1 * w2
        else:
            k = F.conv_transpose2d(w2.reshape(1, ch, *c2.kernel_size), w1, stride=c1.stride, groups=ch)
            k = k.reshape(ch, 1, *k.shape[-2:])
        bias = c2.bias + w2.sum(dim=(1, 2, 3)) * c1.bias
        groups = ch
    elif c2.depthwise and c1.kernel_size == (1, 1) and c1.groups == 1:
        # pointwise -> depthwise: K[m, i] = dw[m] * W1[m, i]
        k = w2[:, 0][:, None] * w1[:, :, 0, 0][:, :, None, None]
        bias = c2.bias + w2.sum(dim=(1, 2, 3)) * c1.bias
        groups = 1
    elif c1.depthwise and c2.kernel_size == (1, 1) and c2.groups == 1:
        # depthwise -> pointwise: K[o, m] = W2[o, m] * dw[m]
        k = w2[:, :, 0, 0][:, :, None, None] * w1[:, 0][None]
        bias = c2.bias + w2[:, :, 0, 0] @ c1.bias
        groups = 1
    else:
        d1, d2 = c1.dense_weight(), c2.dense_weight()
        if c1.kernel_size == (1, 1):
            k = torch.einsum("omuv,mi->oiuv", d2, d1[:, :, 0, 0])
        elif c2.kernel_size == (1, 1):
            k = torch.einsum("om,miuv->oiuv", d2[:, :, 0, 0], d1)
        else:
            k = F.conv_transpose2d(d2, d1, stride=c1.stride)
        bias = c2.bias + torch.einsum("omuv,m->o", d2, c1.bias)
        groups = 1
    stride = (c1.stride[0] * c2.stride[0], c1.stride[1] * c2.stride[1])
    if c1.kernel_size == (1, 1):
        dilation = (c1.stride[0] * c2.dilation[0], c1.stride[1] * c2.dilation[1])
        if c2.padding == "tf_same":
            padding = "tf_same"
        else:
            padding = (c1.stride[0] * c2.padding[0], c1.stride[1] * c2.padding[1])
    elif c2.kernel_size == (1, 1):
        dilation, padding = c1.dilation, c1.padding
    else:
        dilation, padding = (1, 1), c1.padding
    return ConvSpec(k, bias, stride, padding, dilation, groups)


def compose_chain(convs: list[ConvSpec]) -> ConvSpec:
    out = convs[0]
    for c in convs[1:]:
        out = compose(out, c)
    return out


def _aligned_tap(conv: ConvSpec) -> tuple[int, int] | None:
    """The kernel tap that reads input position ``stride * j`` (offset 0), if any."""
    if conv.padding == "tf_same":
        if conv.stride != (1, 1):
            return None  # SAME padding of a strided conv is input-size dependent
        pads = [(d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation)]
    else:
        pads = conv.padding
    tap = []
    for p, d, k in zip(pads, conv.dilation, conv.kernel_size):
        if p % d or p // d >= k:
            return None
        tap.append(p // d)
    if conv.padding == "tf_same" and any(k % 2 == 0 for k in conv.kernel_size):
        return None
    return (tap[0], tap[1])


def can_fold_shortcut(conv: ConvSpec, shortcut) -> bool:
    """Whether ``conv(x) + shortcut(x)`` is one conv (shortcut: ``"identity"`` or a 1x1 ConvSpec)."""
    tap = _aligned_tap(conv)
    if tap is None:
        return False
    if isinstance(shortcut, str):
        return shortcut == "identity" and conv.stride == (1, 1) and conv.in_channels == conv.out_channels
    return (shortcut.pointwise and shortcut.groups == 1 and shortcut.stride == conv.stride
            and shortcut.in_channels == conv.in_channels and shortcut.out_channels == conv.out_channels)


def add_shortcut(conv: ConvSpec, shortcut) -> ConvSpec:
    """``conv(x) + shortcut(x)`` as one conv: the shortcut's 1x1 kernel (identity: Dirac) is added at
    the tap aligned with the output grid."""
    if not can_fold_shortcut(conv, shortcut):
        raise MergeError("the shortcut cannot be folded into this convolution")
    th, tw = _aligned_tap(conv)
    if isinstance(shortcut, str):  # identity
        w = conv.weight.clone()
        n = conv.out_channels
        idx = torch.arange(n, device=w.device)
        if conv.groups == 1:
            w[idx, idx, th, tw] += 1
        else:  # grouped: channel o sits at position o % (I/g) of its group
            w[idx, idx % w.shape[1], th, tw] += 1
        return replace(conv, weight=w)
    w = conv.dense_weight().clone()
    w[:, :, th, tw] += shortcut.weight[:, :, 0, 0].to(w.dtype)
    return replace(conv, weight=w, bias=conv.bias + shortcut.bias.to(w.dtype), groups=1)


# --------------------------------------------------------------------------- planning


def _stride_area(convs) -> int:
    s = 1
    for c in convs:
        s *= c.stride[0] * c.stride[1]
    return s


def segment_macs(convs: list[ConvSpec], before: list[ConvSpec]) -> float:
    """MACs per *input pixel* of the composite of ``convs`` (``before``: the convs that precede it)."""
    comp = convs[0]
    for c in convs[1:]:
        comp = _compose_shape(comp, c)
    return comp.macs_per_output_pixel() / (_stride_area(before) * _stride_area(convs))


def plan_partition(convs: list[ConvSpec], shortcut=None, *, allowed=None) -> tuple[list[list[int]], bool, float]:
    """The cheapest exact way to merge a chain of convs (plus an optional shortcut).

    Tries every split of ``convs`` into consecutive segments, each composed into one conv; a shortcut
    (``"identity"`` or a 1x1 :class:`ConvSpec`) folds into the result only when the whole chain is one
    segment, otherwise it stays a separate add (and a projection shortcut costs its own MACs).
    ``allowed(segments) -> bool`` can veto splits. Returns ``(segments, shortcut_folded, macs per input
    pixel)``; ties go to fewer layers.
    """
    n = len(convs)
    best = None
    for cuts in itertools.product((False, True), repeat=n - 1):
        segments, cur = [], [0]
        for i, cut in enumerate(cuts, start=1):
            if cut:
                segments.append(cur)
                cur = [i]
            else:
                cur.append(i)
        segments.append(cur)
        if allowed is not None and not allowed(segments):
            continue
        ok = all(composable(convs[a], convs[b]) for seg in segments for a, b in zip(seg, seg[1:]))
        if not ok:
            continue
        cost = sum(segment_macs([convs[i] for i in seg], convs[:seg[0]]) for seg in segments)
        folded = False
        if shortcut is not None:
            if len(segments) == 1 and _shape_only_fold(convs, shortcut):
                folded = True
            elif not isinstance(shortcut, str):
                cost += shortcut.macs_per_output_pixel() / (shortcut.stride[0] * shortcut.stride[1])
        key = (cost, len(segments))
        if best is None or key < best[0]:
            best = (key, segments, folded)
    if best is None:
        raise MergeError("no exact merge exists for this chain")
    return best[1], best[2], best[0][0]


def _shape_only_fold(convs, shortcut) -> bool:
    """can_fold_shortcut for the composite of ``convs``, from shapes only."""
    c = convs[0]
    for nxt in convs[1:]:
        c = _compose_shape(c, nxt)
    return can_fold_shortcut(c, shortcut)


def _compose_shape(c1: ConvSpec, c2: ConvSpec) -> ConvSpec:
    k = tuple(a + (b - 1) * s for a, b, s in zip(c1.kernel_size, c2.kernel_size, c1.stride))
    groups = c1.groups if (c1.depthwise and c2.depthwise) else 1
    w = torch.empty(c2.out_channels, c1.in_channels // groups, *k, device="meta")
    stride = (c1.stride[0] * c2.stride[0], c1.stride[1] * c2.stride[1])
    if c1.kernel_size == (1, 1):
        dilation = (c1.stride[0] * c2.dilation[0], c1.stride[1] * c2.dilation[1])
        padding = "tf_same" if c2.padding == "tf_same" else (c1.stride[0] * c2.padding[0],
                                                             c1.stride[1] * c2.padding[1])
    elif c2.kernel_size == (1, 1):
        dilation, padding = c1.dilation, c1.padding
    else:
        dilation, padding = (1, 1), c1.padding
    return ConvSpec(w, torch.empty(c2.out_channels, device="meta"), stride, padding, dilation, groups)


# --------------------------------------------------------------------------- activations

_ACTS = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
}
_ACT_BY_CLASS = {
    "ReLU": "relu", "ReLU6": "relu6", "SiLU": "silu", "Swish": "silu", "SiLUActivation": "silu",
    "Hardswish": "hardswish", "HardSwish": "hardswish", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
}


def act_name(module) -> str | None:
    """Canonical name of an activation module (``None`` for identity); raises for unknown ones."""
    if module is None or isinstance(module, nn.Identity):
        return None
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if name in _ACT_BY_CLASS:
        return _ACT_BY_CLASS[name]
    raise MergeError(f"activation {name} is not supported by the merged block")


def make_act(name: str | None) -> nn.Module | None:
    return None if name is None else _ACTS[name]()


# --------------------------------------------------------------------------- the merged module


class TFSameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow SAME padding computed from the input size (transformers'
    MobileNetV2 with ``tf_padding=True``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, tf_same_pads(x.shape[-2:], self.kernel_size, self.stride, self.dilation))
        return super().forward(x)


def _layer_from_spec(spec: ConvSpec, layout: str, dtype, device) -> nn.Module:
    if layout == "tokens":
        if not spec.pointwise or spec.groups != 1 or spec.stride != (1, 1):
            raise MergeError("token layouts only merge into linear layers")
        layer = nn.Linear(spec.in_channels, spec.out_channels, device=device, dtype=dtype)
        layer.weight.data.copy_(spec.weight[:, :, 0, 0])
        layer.bias.data.copy_(spec.bias)
        return layer
    cls = TFSameConv2d if spec.padding == "tf_same" else nn.Conv2d
    padding = 0 if spec.padding == "tf_same" else spec.padding
    layer = cls(spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=padding,
                dilation=spec.dilation, groups=spec.groups, bias=True, device=device, dtype=dtype)
    layer.weight.data.copy_(spec.weight)
    layer.bias.data.copy_(spec.bias)
    return layer


def _describe_layer(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return {"op": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    return {"op": "conv2d", "in": layer.in_channels, "out": layer.out_channels, "kernel": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": "tf_same" if isinstance(layer, TFSameConv2d) else list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None}


def _layer_from_description(d: dict) -> nn.Module:
    if d["op"] == "linear":
        return nn.Linear(d["in"], d["out"], bias=d["bias"])
    if d["op"] != "conv2d":
        raise MergeError(f"unknown merged layer op {d['op']!r}")
    tf = d["padding"] == "tf_same"
    cls = TFSameConv2d if tf else nn.Conv2d
    return cls(d["in"], d["out"], tuple(d["kernel"]), stride=tuple(d["stride"]),
               padding=0 if tf else tuple(d["padding"]), dilation=tuple(d["dilation"]), groups=d["groups"],
               bias=d["bias"])


class MergedBlock(nn.Module):
    """A pruned block after merging: ``act(body(x) + shortcut(x))``.

    ``body`` is a chain of ``nn.Conv2d`` (``layout="nchw"``) or ``nn.Linear`` (``layout="tokens"``,
    inputs ``(..., C)``); ``shortcut`` is ``None`` (no residual, or it was folded into the body),
    ``nn.Identity`` or a 1x1 conv; ``act`` is an activation or ``None``. Extra positional / keyword
    arguments (attention masks a transformer encoder passes to its layers) are ignored.
    """

    def __init__(self, layers: list[nn.Module], shortcut: nn.Module | None = None, act: str | None = None,
                 layout: str = "nchw", family: str = "", source_type: str = ""):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.shortcut = shortcut
        self.act = make_act(act)
        self.act_kind = act
        self.layout = layout
        self.family = family
        self.source_type = source_type

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        if self.act is not None:
            y = self.act(y)
        return y

    def describe(self) -> dict:
        """JSON-serialisable structure (no weights)."""
        if self.shortcut is None:
            sc = None
        elif isinstance(self.shortcut, nn.Identity):
            sc = "identity"
        else:
            sc = _describe_layer(self.shortcut)
        return {"type": "UPDPMergedBlock", "family": self.family, "source_type": self.source_type,
                "layout": self.layout, "body": [_describe_layer(m) for m in self.body], "shortcut": sc,
                "act": self.act_kind}

    @classmethod
    def from_description(cls, d: dict) -> MergedBlock:
        """Rebuild the module (uninitialised weights) from :meth:`describe`'s output."""
        if d.get("type") != "UPDPMergedBlock":
            raise MergeError(f"not a merged-block description: {d.get('type')!r}")
        sc = d.get("shortcut")
        shortcut = None if sc is None else nn.Identity() if sc == "identity" else _layer_from_description(sc)
        return cls([_layer_from_description(x) for x in d["body"]], shortcut, d.get("act"), d.get("layout", "nchw"),
                   d.get("family", ""), d.get("source_type", ""))

    def extra_repr(self) -> str:
        return f"family={self.family!r}, layout={self.layout!r}"


def build_merged(segments: list[ConvSpec], shortcut, act: str | None, layout: str, *, dtype, device,
                 family: str = "", source_type: str = "") -> MergedBlock:
    """Make the :class:`MergedBlock` from composed segments (shortcut: None | "identity" | ConvSpec)."""
    layers = [_layer_from_spec(s, layout, dtype, device) for s in segments]
    if shortcut is None:
        sc = None
    elif isinstance(shortcut, str):
        sc = nn.Identity()
    else:
        sc = _layer_from_spec(shortcut, layout, dtype, device)
    return MergedBlock(layers, sc, act, layout, family, source_type)
