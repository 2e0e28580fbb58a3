"""UPDP block strategies, one per block family, for timm and transformers.

A strategy wraps one block in an :class:`AnnealedBlock` whose coefficient ``lam`` (lambda) moves it
from the original block (``lam = 0``, computed by the original module itself, so bit-exact) to a
*mergeable* form (``lam = 1``) that :meth:`AnnealedBlock.merge` turns exactly into a
:class:`~hf_prune.methods.updp.merge.MergedBlock`. What each family keeps and how it merges is
listed in :mod:`hf_prune.methods.updp.depth`'s docstring; the code below is the implementation.

Annealed operators (``0 < lam < 1``):

* activation inside the block: ``act_lam(x) = (1 - lam) * act(x) + lam * x``;
* normalisation that cannot be folded (LayerNorm): ``norm_lam(x) = (1 - lam) * LN(x) + lam * BN(x)``,
  the BN initialised from the LN's affine and calibrated (running stats = per-channel statistics
  of the LN's input);
* a BN added at the end of a residual branch (ConvNeXt, ViT): ``(1 - lam) * h + lam * BN(h)``,
  calibrated so that ``BN(h) = h`` on the calibration data;
* an activation added after the residual sum (ConvNeXt, ViT, inverted residual; optional):
  ``(1 - lam) * y + lam * act(y)``;
* ResNet: the off-centre taps of the middle 3x3 conv are scaled by ``(1 - lam)`` (kernel
  annealing) so the conv becomes 1x1 at ``lam = 1``;
* ViT: the attention branch is scaled by ``(1 - lam)`` and vanishes at ``lam = 1``;
* inverted residual merged whole: the depthwise conv's zero padding becomes padding with value
  ``lam * c`` where ``c`` is what the expansion conv + BN output for a zero input (eval statistics);
  at ``lam = 1`` this is exactly "padding moved to the block input", so the merged dense conv is exact
  at the borders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PruningError
from .merge import (ConvSpec, MergeError, act_name, add_shortcut, bn_affine, build_merged, compose_chain, fold_after,
                    fold_before, make_act, plan_partition, tf_same_pads)

__all__ = ["UnsupportedBlock", "AnnealedBlock", "block_family", "check_block", "make_annealed", "FAMILIES"]


class UnsupportedBlock(PruningError):
    """A block of a known family in a configuration UPDP cannot merge (the reason is in the message)."""


# (class module, class name) -> (family, library)
FAMILIES: dict[tuple[str, str], tuple[str, str]] = {
    ("timm.models.convnext", "ConvNeXtBlock"): ("convnext", "timm"),
    ("transformers.models.convnext.modeling_convnext", "ConvNextLayer"): ("convnext", "transformers"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"): ("inverted_residual", "timm"),
    ("transformers.models.mobilenet_v2.modeling_mobilenet_v2", "MobileNetV2InvertedResidual"):
        ("inverted_residual", "transformers"),
    ("timm.models.resnet", "BasicBlock"): ("resnet_basic", "timm"),
    ("timm.models.resnet", "Bottleneck"): ("resnet_bottleneck", "timm"),
    ("transformers.models.resnet.modeling_resnet", "ResNetBasicLayer"): ("resnet_basic", "transformers"),
    ("transformers.models.resnet.modeling_resnet", "ResNetBottleNeckLayer"): ("resnet_bottleneck", "transformers"),
    ("timm.models.vision_transformer", "Block"): ("vit", "timm"),
    ("transformers.models.vit.modeling_vit", "ViTLayer"): ("vit", "transformers"),
    ("transformers.models.deit.modeling_deit", "DeiTLayer"): ("vit", "transformers"),
}


def block_family(module: nn.Module) -> tuple[str, str] | None:
    """``(family, library)`` of a block UPDP knows, else ``None`` (exact class match, no subclasses)."""
    return FAMILIES.get((type(module).__module__, type(module).__name__))


# --------------------------------------------------------------------------- small helpers


def _get(root: nn.Module, path: str | None):
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _act(act, x):
    """Apply an activation out of place (timm and torchvision blocks use ``inplace=True``)."""
    if act is None:
        return x
    if getattr(act, "inplace", False):
        x = x.clone()
    return act(x)


def _blend_act(act, x, lam):
    """``(1 - lam) * act(x) + lam * x``."""
    if act is None or lam >= 1.0:
        return x
    if lam <= 0.0:
        return _act(act, x)
    return torch.lerp(_act(act, x), x, lam)


def _blend_in(act, y, lam):
    """``(1 - lam) * y + lam * act(y)`` (an activation that appears as lam grows)."""
    if act is None or lam <= 0.0:
        return y
    if lam >= 1.0:
        return act(y)
    return torch.lerp(y, act(y), lam)


def _mix(a, b, lam):
    """``(1 - lam) * a + lam * b`` where ``a`` / ``b`` are zero-argument callables (only the needed one runs)."""
    if lam <= 0.0:
        return a()
    if lam >= 1.0:
        return b()
    return torch.lerp(a(), b(), lam)


def _bn(bn, x):
    """The BatchNorm part of a (possibly fused BN + act) module."""
    if bn is None:
        return x
    if isinstance(bn, nn.BatchNorm2d):
        return nn.BatchNorm2d.forward(bn, x)
    return bn(x)


def _bn_tokens(bn: nn.BatchNorm1d, x):
    shape = x.shape
    return bn(x.reshape(-1, shape[-1])).reshape(shape)


def _ln_channels_first(norm: nn.LayerNorm, z):
    return F.layer_norm(z.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                        norm.eps).permute(0, 3, 1, 2)


def _require(cond, msg):
    if not cond:
        raise UnsupportedBlock(msg)


def _plain_conv(m, what):
    _require(type(m).__name__ in ("Conv2d", "TFSameConv2d") and isinstance(m, nn.Conv2d),
             f"{what} is a {type(m).__name__}, not a plain Conv2d (e.g. dynamic 'same' padding)")
    _require(m.padding_mode == "zeros" and not isinstance(m.padding, str), f"{what}: unsupported padding")


def _act_supported(m, what):
    try:
        act_name(m)
    except MergeError as exc:
        raise UnsupportedBlock(f"{what}: {exc}") from None


def _layernorm_like(m, what):
    _require(isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1,
             f"{what} is a {type(m).__name__}, expected a LayerNorm over channels")


def _new_bn(cls, n, ref: torch.Tensor, eps=1e-5, weight=None, bias=None):
    bn = cls(n, eps=eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if weight is not None:
            bn.weight.copy_(weight.detach())
        if bias is not None:
            bn.bias.copy_(bias.detach())
        bn.running_var.fill_(1.0)
    return bn


# --------------------------------------------------------------------------- base wrapper


class AnnealedBlock(nn.Module):
    """A block on its way to being merged; ``lam`` in [0, 1] (``set_lambda``).

    The original block is the child ``block`` (its parameters keep their objects, so an optimizer
    built before wrapping still trains them); new modules (BNs replacing LayerNorms, BNs and
    activations added at the end) are children of the wrapper. At ``lam == 0`` the forward *is*
    ``block.forward``. ``lam`` is saved in the state dict (extra state).
    """

    family = ""
    layout = "nchw"

    def __init__(self, block: nn.Module, library: str, *, end_act: bool = True):
        super().__init__()
        self.block = block
        self.library = library
        self.source_type = type(block).__name__
        self.family = type(self).family or block_family(block)[0]
        self.lam = 0.0
        self.use_end_act = bool(end_act)
        self._calib: dict | None = None
        self.check(block, library)
        self._build()
        ops, shortcut, _ = self.linear_form(shapes_only=True)
        self.plan = plan_partition(ops, shortcut, allowed=self._allowed)
        self._configure(self.plan[0])

    # ---- per family
    @classmethod
    def check(cls, block, library):  # raise UnsupportedBlock
        raise NotImplementedError

    def _build(self):
        pass

    def _allowed(self, segments) -> bool:
        return True

    def _configure(self, segments) -> None:
        pass

    def annealed_forward(self, x, *args, **kwargs):
        raise NotImplementedError

    def linear_form(self, shapes_only: bool = False):
        """``(convs, shortcut, act)`` of the block at ``lam = 1`` in eval mode."""
        raise NotImplementedError

    def apply_calibration(self) -> None:
        """Set new BNs from the statistics gathered while ``_calib`` was active (see ``calibrate``)."""
        stats = self._calib or {}
        norm_bn, end_bn = getattr(self, "norm_bn", None), getattr(self, "end_bn", None)
        with torch.no_grad():
            if norm_bn is not None and "norm_in" in stats:
                mean, var = _finish(stats["norm_in"])
                norm_bn.running_mean.copy_(mean)
                norm_bn.running_var.copy_(var)
            if end_bn is not None and "branch" in stats:
                mean, var = _finish(stats["branch"])
                end_bn.running_mean.copy_(mean)
                end_bn.running_var.copy_(var)
                end_bn.weight.copy_(torch.sqrt(var + end_bn.eps))
                end_bn.bias.copy_(mean)

    # ---- generic
    def set_lambda(self, lam: float) -> None:
        self.lam = float(min(1.0, max(0.0, lam)))

    def get_extra_state(self):
        # a tensor (not a dict) so that safetensors checkpoints (save_pretrained, Trainer) can hold it
        return torch.tensor(self.lam, dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        self.lam = float(state["lam"] if isinstance(state, dict) else state)

    def forward(self, x, *args, **kwargs):
        if self.lam <= 0.0 and self._calib is None:
            return self.block(x, *args, **kwargs)
        return self.annealed_forward(x, *args, **kwargs)

    def _p(self, path):
        return _get(self.block, path)

    def _record(self, key, t, dim):
        if self._calib is None:
            return
        c = t.shape[dim]
        flat = t.detach().movedim(dim, -1).reshape(-1, c).double()
        s = self._calib.setdefault(key, [0.0, 0.0, 0])
        s[0] = s[0] + flat.sum(0)
        s[1] = s[1] + (flat * flat).sum(0)
        s[2] += flat.shape[0]

    def _ref(self) -> torch.Tensor:
        return next(self.block.parameters())

    def merge(self) -> nn.Module:
        """The exact merged module (``lam`` must be 1; BN running statistics are used)."""
        if self.lam < 1.0:
            raise MergeError(f"block ({self.source_type}) is at lambda={self.lam:.3f}; merging is exact only at 1")
        ops, shortcut, act = self.linear_form()
        segments, folded, _ = self.plan
        composite = [compose_chain([ops[i] for i in seg]) for seg in segments]
        if shortcut is not None and folded:
            composite[-1] = add_shortcut(composite[-1], shortcut)
            shortcut = None
        ref = self._ref()
        return build_merged(composite, shortcut, act, self.layout, dtype=ref.dtype, device=ref.device,
                            family=self.family, source_type=self.source_type)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, library={self.library!r}, lam={self.lam:.4f}"


def _finish(s):
    total, sq, n = s
    mean = total / max(n, 1)
    var = (sq / max(n, 1) - mean * mean).clamp_min(0)
    return mean, var


def _spec(module, shapes_only, **kw) -> ConvSpec:
    if shapes_only:
        w = module.weight
        if isinstance(module, nn.Linear):
            return ConvSpec(torch.empty(w.shape[0], w.shape[1], 1, 1, device="meta"),
                            torch.empty(w.shape[0], device="meta"))
        padding = "tf_same" if kw.get("tf_same") else module.padding
        return ConvSpec(torch.empty(w.shape, device="meta"), torch.empty(w.shape[0], device="meta"), module.stride,
                        padding, module.dilation, module.groups)
    return ConvSpec.from_module(module, **kw)


def _fold_bn(spec, bn, shapes_only):
    return spec if shapes_only or bn is None else fold_after(spec, *bn_affine(bn))


# --------------------------------------------------------------------------- ConvNeXt V1


class AnnealedConvNeXt(AnnealedBlock):
    """ConvNeXt V1 block: dw7x7 -> LN -> fc1 -> GELU -> fc2 -> layer scale, + x.

    Mergeable form: dw7x7 -> BN -> fc1 -> fc2 -> layer scale -> BN_end, + x, -> GELU (optional).
    Merged: dw7x7 (BN folded, stays depthwise) -> 1x1 C->C (fc2.fc1, layer scale and BN_end folded),
    + x, -> GELU. The 7x7 depthwise conv is not merged into the 1x1 (a dense 7x7 would cost more MACs).
    """

    family = "convnext"
    PATHS = {
        "timm": dict(dw="conv_dw", norm="norm", fc1="mlp.fc1", act="mlp.act", drop1="mlp.drop1", fc2="mlp.fc2",
                     drop2="mlp.drop2", gamma="gamma", drop_path="drop_path"),
        "transformers": dict(dw="dwconv", norm="layernorm", fc1="pwconv1", act="act", fc2="pwconv2",
                             gamma="layer_scale_parameter", drop_path="drop_path"),
    }

    @classmethod
    def check(cls, block, library):
        p = {k: _get(block, v) for k, v in cls.PATHS[library].items()}
        _plain_conv(p["dw"], "conv_dw")
        _require(p["dw"].groups == p["dw"].in_channels == p["dw"].out_channels, "conv_dw is not depthwise")
        _require(p["dw"].stride == (1, 1), "strided ConvNeXt blocks are not supported")
        _layernorm_like(p["norm"], "norm")
        _act_supported(p["act"], "mlp activation")
        if library == "timm":
            _require(type(block.mlp).__name__ == "Mlp", f"{type(block.mlp).__name__} (e.g. ConvNeXt V2 GRN) "
                     "is not mergeable")
            _require(_is_identity(block.mlp.norm), "an MLP norm is not mergeable")
            _require(_is_identity(block.shortcut), "a projection shortcut inside the block is not supported")
        for k in ("fc1", "fc2"):
            _require(isinstance(p[k], (nn.Linear, nn.Conv2d)), f"{k} is a {type(p[k]).__name__}")

    def _path(self, name):
        return self.PATHS[self.library].get(name)

    def _build(self):
        norm = self._p(self._path("norm"))
        c = self._p(self._path("dw")).out_channels
        ref = self._ref()
        self.channels_last = isinstance(self._p(self._path("fc1")), nn.Linear)
        self.norm_bn = _new_bn(nn.BatchNorm2d, c, ref, eps=norm.eps, weight=norm.weight, bias=norm.bias)
        self.end_bn = _new_bn(nn.BatchNorm2d, c, ref)
        self.end_act = make_act(act_name(self._p(self._path("act")))) if self.use_end_act else None

    def annealed_forward(self, x, *args, **kwargs):
        lam, g = self.lam, lambda n: self._p(self._path(n))
        shortcut = x
        z = g("dw")(x)
        self._record("norm_in", z, 1)
        n = _mix(lambda: _ln_channels_first(g("norm"), z), lambda: self.norm_bn(z), lam)
        if self.channels_last:
            n = n.permute(0, 2, 3, 1)
        h = g("fc1")(n)
        h = _blend_act(g("act"), h, lam)
        if g("drop1") is not None:
            h = g("drop1")(h)
        h = g("fc2")(h)
        if g("drop2") is not None:
            h = g("drop2")(h)
        if self.channels_last:
            h = h.permute(0, 3, 1, 2)
        gamma = g("gamma")
        if gamma is not None:
            h = h * gamma.view(1, -1, 1, 1)
        self._record("branch", h, 1)
        h = _mix(lambda: h, lambda: self.end_bn(h), lam)
        y = g("drop_path")(h) + shortcut
        return _blend_in(self.end_act, y, lam)

    def linear_form(self, shapes_only=False):
        g = lambda n: self._p(self._path(n))  # noqa: E731
        dw = _fold_bn(_spec(g("dw"), shapes_only), self.norm_bn, shapes_only)
        fc1 = _spec(g("fc1"), shapes_only)
        fc2 = _spec(g("fc2"), shapes_only)
        if not shapes_only:
            gamma = g("gamma")
            if gamma is not None:
                fc2 = fold_after(fc2, gamma.detach().to(fc2.weight.dtype))
            fc2 = fold_after(fc2, *bn_affine(self.end_bn))
        act = act_name(self.end_act) if self.end_act is not None else None
        return [dw, fc1, fc2], "identity", act


# --------------------------------------------------------------------------- inverted residual (MobileNetV2)


class AnnealedInvertedResidual(AnnealedBlock):
    """MobileNetV2 inverted residual: pw 1x1 -> BN -> ReLU6 -> dw 3x3 -> BN -> ReLU6 -> pw 1x1 -> BN (+ x).

    Mergeable form: both ReLU6 -> identity, the projection BN is the kept BN, a ReLU6 after the
    residual sum appears with lambda (optional). Merged (when it costs fewer MACs, as for every
    MobileNetV2 block with expansion 6): one dense 3x3 conv Cin->Cout with stride s, identity folded
    as a Dirac kernel, then ReLU6. Otherwise the three convs stay separate (BNs folded).
    """

    family = "inverted_residual"
    PATHS = {
        "timm": dict(pw="conv_pw", bn1="bn1", act1="bn1.act", dw="conv_dw", bn2="bn2", act2="bn2.act",
                     pwl="conv_pwl", bn3="bn3", drop_path="drop_path"),
        "transformers": dict(pw="expand_1x1.convolution", bn1="expand_1x1.normalization",
                             act1="expand_1x1.activation", dw="conv_3x3.convolution",
                             bn2="conv_3x3.normalization", act2="conv_3x3.activation",
                             pwl="reduce_1x1.convolution", bn3="reduce_1x1.normalization"),
    }

    @classmethod
    def check(cls, block, library):
        p = {k: _get(block, v) for k, v in cls.PATHS[library].items()}
        for k in ("pw", "dw", "pwl"):
            _plain_conv(p[k], k)
        _require(p["pw"].kernel_size == (1, 1) and p["pwl"].kernel_size == (1, 1), "expansion/projection not 1x1")
        _require(p["pw"].stride == (1, 1) and p["pwl"].stride == (1, 1), "strided 1x1 convs are not supported")
        for k in ("bn1", "bn2", "bn3"):
            _require(isinstance(p[k], nn.BatchNorm2d), f"{k} is a {type(p[k]).__name__}, not a BatchNorm2d")
        _act_supported(p["act1"], "act1")
        if library == "timm":
            _require(block.conv_s2d is None, "space-to-depth blocks are not supported")
            _require(_is_identity(block.se), "squeeze-excitation is not mergeable")
            _require(_is_identity(block.aa), "anti-aliasing is not supported")
            for k in ("bn1", "bn2", "bn3"):
                _require(_is_identity(getattr(p[k], "drop", None)), f"{k} has a drop layer")
            _require(_is_identity(p["bn3"].act), "the projection BN has an activation")
        else:
            _require(block.reduce_1x1.activation is None, "the projection has an activation")

    def _path(self, name):
        return self.PATHS[self.library].get(name)

    def _g(self, name):
        return self._p(self._path(name))

    @property
    def has_skip(self) -> bool:
        return bool(self.block.has_skip if self.library == "timm" else self.block.use_residual)

    @property
    def tf_same(self) -> bool:
        return self.library == "transformers" and bool(self.block.expand_1x1.config.tf_padding)

    def _build(self):
        self.end_act = make_act(act_name(self._g("act1"))) if self.use_end_act else None
        self.pad_with_bias = False

    def _configure(self, segments):
        # the dw conv reads padding; if it is merged with the expansion conv the padding must carry
        # the expansion's bias at lambda = 1 (padding moved to the block input)
        self.pad_with_bias = any(0 in seg and 1 in seg for seg in segments)

    def _pw_shift(self):
        pw, bn = self._g("pw"), self._g("bn1")
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        b = pw.bias if pw.bias is not None else torch.zeros_like(bn.running_mean)
        c = (b - bn.running_mean) * a
        return c + bn.bias if bn.bias is not None else c

    def annealed_forward(self, x, *args, **kwargs):
        lam, g = self.lam, self._g
        shortcut = x
        h = g("pw")(x)
        h = _blend_act(g("act1"), _bn(g("bn1"), h), lam)
        dw = g("dw")
        if self.tf_same:
            pads = tf_same_pads(h.shape[-2:], dw.kernel_size, dw.stride, dw.dilation)
        else:
            ph, pw = dw.padding
            pads = (pw, pw, ph, ph)
        if self.pad_with_bias and lam > 0.0:
            v = (lam * self._pw_shift()).view(1, -1, 1, 1)
            h = F.pad(h - v, pads) + v
        else:
            h = F.pad(h, pads)
        h = F.conv2d(h, dw.weight, dw.bias, dw.stride, 0, dw.dilation, dw.groups)
        h = _blend_act(g("act2"), _bn(g("bn2"), h), lam)
        h = _bn(g("bn3"), g("pwl")(h))
        if self.has_skip:
            dp = g("drop_path")
            y = (dp(h) if dp is not None else h) + shortcut
        else:
            y = h
        return _blend_in(self.end_act, y, lam)

    def linear_form(self, shapes_only=False):
        tf = self.tf_same
        pw = _fold_bn(_spec(self._g("pw"), shapes_only, tf_same=tf), self._g("bn1"), shapes_only)
        dw = _fold_bn(_spec(self._g("dw"), shapes_only, tf_same=tf), self._g("bn2"), shapes_only)
        pwl = _fold_bn(_spec(self._g("pwl"), shapes_only, tf_same=tf), self._g("bn3"), shapes_only)
        act = act_name(self.end_act) if self.end_act is not None else None
        return [pw, dw, pwl], ("identity" if self.has_skip else None), act


# --------------------------------------------------------------------------- ResNet


class AnnealedResNet(AnnealedBlock):
    """ResNet basic (3x3 -> 3x3) and bottleneck (1x1 -> 3x3 -> 1x1) blocks, identity or projection shortcut.

    Mergeable form: inner ReLUs -> identity, and the middle 3x3 conv anneals to its centre tap
    (off-centre taps scaled by 1 - lambda), so the branch is a chain of convs whose composite has the
    first conv's geometry. The output ReLU after the sum is the block's own and is kept; the BNs fold.
    Merged, basic: one 3x3 conv Cin->Cout, stride s, with the shortcut (Dirac or 1x1 projection) folded
    in, then ReLU. Bottleneck: the cheapest exact split (MACs) of the 1x1 chain: typically
    ``1x1 Cin->w`` then ``1x1 w->Cout`` + x (identity blocks) or one ``1x1 Cin->Cout`` with the projection
    folded (downsampling blocks), then ReLU.
    """

    PATHS = {
        ("timm", "resnet_basic"): dict(convs=["conv1", "conv2"], bns=["bn1", "bn2"], acts=["act1"], out="act2",
                                       drop_path="drop_path"),
        ("timm", "resnet_bottleneck"): dict(convs=["conv1", "conv2", "conv3"], bns=["bn1", "bn2", "bn3"],
                                            acts=["act1", "act2"], out="act3", drop_path="drop_path"),
        ("transformers", "resnet_basic"): dict(
            convs=["layer.0.convolution", "layer.1.convolution"],
            bns=["layer.0.normalization", "layer.1.normalization"], acts=["layer.0.activation"], out="activation"),
        ("transformers", "resnet_bottleneck"): dict(
            convs=["layer.0.convolution", "layer.1.convolution", "layer.2.convolution"],
            bns=["layer.0.normalization", "layer.1.normalization", "layer.2.normalization"],
            acts=["layer.0.activation", "layer.1.activation"], out="activation"),
    }
    SHRINK = 1  # index of the conv annealed to its centre tap

    @classmethod
    def _paths(cls, block, library):
        return cls.PATHS[(library, block_family(block)[0])]

    @classmethod
    def _shortcut_paths(cls, block, library):
        if library == "timm":
            ds = block.downsample
            if ds is None:
                return None
            _require(isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                     and isinstance(ds[1], nn.BatchNorm2d), "only conv + BN downsampling shortcuts are supported "
                     "(not avg-pool 'd' variants)")
            return ("downsample.0", "downsample.1")
        sc = block.shortcut
        if _is_identity(sc):
            return None
        return ("shortcut.convolution", "shortcut.normalization")

    @classmethod
    def check(cls, block, library):
        paths = cls._paths(block, library)
        convs = [_get(block, p) for p in paths["convs"]]
        for i, c in enumerate(convs):
            _plain_conv(c, f"conv{i + 1}")
        for p in paths["bns"]:
            _require(isinstance(_get(block, p), nn.BatchNorm2d), f"{p} is not a BatchNorm2d")
        mid = convs[cls.SHRINK]
        _require(mid.kernel_size[0] % 2 == 1 and mid.kernel_size[1] % 2 == 1, "even middle kernel")
        for d, k, p in zip(mid.dilation, mid.kernel_size, mid.padding):
            _require(p == d * (k - 1) // 2, "the middle conv is not 'same'-padded")
        for i, c in enumerate(convs):
            if i != 0 and i != cls.SHRINK:
                _require(c.kernel_size == (1, 1) and c.padding == (0, 0), f"conv{i + 1} is not 1x1")
            if i == 0 and len(convs) == 3:
                _require(c.kernel_size == (1, 1) and c.padding == (0, 0), "conv1 is not 1x1")
        _act_supported(_get(block, paths["out"]), "output activation")
        if library == "timm":
            for name in ("drop_block", "aa"):
                _require(_is_identity(getattr(block, name, None)), f"{name} is not supported")
            _require(getattr(block, "se", None) is None, "attention / SE layers are not mergeable")
        else:
            _require(_is_identity(block.layer[-1].activation), "the last conv layer has an activation")
        sc = cls._shortcut_paths(block, library)
        if sc is not None:
            conv = _get(block, sc[0])
            _plain_conv(conv, "shortcut conv")
            _require(conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1,
                     "the shortcut conv is not a plain 1x1 conv")

    def _build(self):
        paths = self._paths(self.block, self.library)
        self._convs, self._bns, self._acts = paths["convs"], paths["bns"], paths["acts"]
        self._out, self._dp = paths["out"], paths.get("drop_path")
        self._sc = self._shortcut_paths(self.block, self.library)

    def _tap(self, conv):
        return tuple(p // d for p, d in zip(conv.padding, conv.dilation))

    def annealed_forward(self, x, *args, **kwargs):
        lam = self.lam
        h = x
        n = len(self._convs)
        for i in range(n):
            conv, bn = self._p(self._convs[i]), self._p(self._bns[i])
            if i == self.SHRINK and lam > 0.0:
                mask = torch.full(conv.kernel_size, 1.0 - lam, dtype=conv.weight.dtype, device=conv.weight.device)
                mask[self._tap(conv)] = 1.0
                h = F.conv2d(h, conv.weight * mask, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            else:
                h = conv(h)
            h = _bn(bn, h)
            if i < n - 1:
                h = _blend_act(self._p(self._acts[i]), h, lam)
        dp = self._p(self._dp) if self._dp else None
        if dp is not None:
            h = dp(h)
        sc = x if self._sc is None else _bn(self._p(self._sc[1]), self._p(self._sc[0])(x))
        return _act(self._p(self._out), h + sc)

    def linear_form(self, shapes_only=False):
        ops = []
        for i, (cp, bp) in enumerate(zip(self._convs, self._bns)):
            conv = self._p(cp)
            spec = _spec(conv, shapes_only)
            if i == self.SHRINK:
                th, tw = self._tap(conv)
                spec = ConvSpec(spec.weight[:, :, th:th + 1, tw:tw + 1], spec.bias, conv.stride, (0, 0), (1, 1),
                                conv.groups)
            ops.append(_fold_bn(spec, self._p(bp), shapes_only))
        if self._sc is None:
            shortcut = "identity"
        else:
            shortcut = _fold_bn(_spec(self._p(self._sc[0]), shapes_only), self._p(self._sc[1]), shapes_only)
        return ops, shortcut, act_name(self._p(self._out))


# --------------------------------------------------------------------------- ViT / DeiT


class AnnealedViT(AnnealedBlock):
    """Pre-norm transformer block: x + attn(LN1 x), then + mlp(LN2 .) (timm Block, HF ViTLayer / DeiTLayer).

    Mergeable form: the attention branch is scaled by (1 - lambda) and is gone at lambda = 1 (attention
    cannot be merged into a linear map); in the MLP branch LN2 -> BN, GELU -> identity, a BN ends the
    branch, and a GELU after the residual sum appears with lambda (optional). Merged: one Linear D->D
    (BN before fc1 folded — exact, a linear layer reads no padding — fc2.fc1, layer scale, end BN and
    the identity residual all folded), then GELU.
    """

    family = "vit"
    layout = "tokens"
    PATHS = {
        "timm": dict(norm1="norm1", attn="attn", ls1="ls1", dp1="drop_path1", norm2="norm2", fc1="mlp.fc1",
                     act="mlp.act", drop1="mlp.drop1", fc2="mlp.fc2", drop2="mlp.drop2", ls2="ls2", dp2="drop_path2"),
        "transformers": dict(norm1="layernorm_before", attn="attention", dp1="dropout", norm2="layernorm_after",
                             fc1="mlp.fc1", act="mlp.activation_fn", fc2="mlp.fc2", dp2="dropout"),
    }

    @classmethod
    def check(cls, block, library):
        p = {k: _get(block, v) for k, v in cls.PATHS[library].items()}
        _layernorm_like(p["norm2"], "norm2")
        for k in ("fc1", "fc2"):
            _require(isinstance(p[k], nn.Linear), f"{k} is a {type(p[k]).__name__}, not a Linear")
        _act_supported(p["act"], "mlp activation")
        if library == "timm":
            _require(type(block.mlp).__name__ == "Mlp", f"{type(block.mlp).__name__} is not mergeable (gated MLP)")
            _require(_is_identity(block.mlp.norm), "an MLP norm is not mergeable")
            _require(_is_identity(block.ls2) or hasattr(block.ls2, "gamma"), "unknown layer scale")

    def _g(self, name):
        return self._p(self.PATHS[self.library].get(name))

    def _build(self):
        norm = self._g("norm2")
        d = self._g("fc1").in_features
        ref = self._ref()
        self.norm_bn = _new_bn(nn.BatchNorm1d, d, ref, eps=norm.eps, weight=norm.weight, bias=norm.bias)
        self.end_bn = _new_bn(nn.BatchNorm1d, d, ref)
        self.end_act = make_act(act_name(self._g("act"))) if self.use_end_act else None

    def _attention(self, x, *args, **kwargs):
        if self.library == "timm":
            attn_mask = kwargs.get("attn_mask", args[0] if args else None)
            is_causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
            a = self._g("attn")(self._g("norm1")(x), attn_mask=attn_mask, is_causal=is_causal)
            return self._g("dp1")(self._g("ls1")(a))
        attention_mask = args[0] if args else kwargs.pop("attention_mask", None)
        a, _ = self._g("attn")(self._g("norm1")(x), attention_mask, **kwargs)
        return self._g("dp1")(a)

    def annealed_forward(self, x, *args, **kwargs):
        lam, g = self.lam, self._g
        if lam < 1.0:
            a = self._attention(x, *args, **kwargs)
            x = x + a if lam <= 0.0 else x + (1.0 - lam) * a
        self._record("norm_in", x, -1)
        z = x
        n = _mix(lambda: g("norm2")(z), lambda: _bn_tokens(self.norm_bn, z), lam)
        h = _blend_act(g("act"), g("fc1")(n), lam)
        if g("drop1") is not None:
            h = g("drop1")(h)
        h = g("fc2")(h)
        if g("drop2") is not None:
            h = g("drop2")(h)
        if g("ls2") is not None:
            h = g("ls2")(h)
        self._record("branch", h, -1)
        h = _mix(lambda: h, lambda: _bn_tokens(self.end_bn, h), lam)
        y = x + g("dp2")(h)
        return _blend_in(self.end_act, y, lam)

    def linear_form(self, shapes_only=False):
        fc1 = _spec(self._g("fc1"), shapes_only)
        fc2 = _spec(self._g("fc2"), shapes_only)
        if not shapes_only:
            fc1 = fold_before(*bn_affine(self.norm_bn), fc1)
            ls2 = self._g("ls2")
            if ls2 is not None and hasattr(ls2, "gamma"):
                fc2 = fold_after(fc2, ls2.gamma.detach().to(fc2.weight.dtype))
            fc2 = fold_after(fc2, *bn_affine(self.end_bn))
        act = act_name(self.end_act) if self.end_act is not None else None
        return [fc1, fc2], "identity", act


_CLASSES = {"convnext": AnnealedConvNeXt, "inverted_residual": AnnealedInvertedResidual,
            "resnet_basic": AnnealedResNet, "resnet_bottleneck": AnnealedResNet, "vit": AnnealedViT}


def check_block(module: nn.Module) -> tuple[str, str]:
    """``(family, library)`` if UPDP can merge ``module``; raises :class:`UnsupportedBlock` otherwise."""
    fam = block_family(module)
    if fam is None:
        raise UnsupportedBlock(f"{type(module).__name__} is not a block family UPDP knows")
    family, library = fam
    _CLASSES[family].check(module, library)
    return family, library


def make_annealed(module: nn.Module, *, end_act: bool = True) -> AnnealedBlock:
    family, library = check_block(module)
    return _CLASSES[family](module, library, end_act=end_act)
