"""The engine's shape-only forward passes give what a real forward pass gives."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_prune.engine.graph.shape_only import NeedsValues, ShapeOnly
from hf_prune.engine.graph.tracer import _trace, trace

from test_engine import MODELS


def _partition(tr):
    return tr.uf.find(torch.arange(tr.uf.size))


@pytest.mark.parametrize("name", list(MODELS))
def test_shape_only_trace_equals_real_trace(name):
    model, x = MODELS[name]()
    fast, real = _trace(model, x, values=False), _trace(model, x, values=True)
    assert torch.equal(_partition(fast), _partition(real))
    assert [(r.module, r.op, r.shape, r.const) for r in fast.macs] == [(r.module, r.op, r.shape, r.const)
                                                                       for r in real.macs]
    pinned = [torch.unique(tr.uf.find(torch.cat(tr.pins.labels))) for tr in (fast, real)]
    assert torch.equal(*pinned)
    assert fast.output_shapes == real.output_shapes


class _ValueDependent(nn.Module):
    """Keeps the tokens whose features are large, and branches on a value inside a try block."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        score = h.norm(dim=-1)
        kept = h[score > score.median()]  # how many tokens: a value
        try:
            positive = bool(kept.sum() > 0)  # a model's own except must not hide the fallback
        except Exception:
            positive = False
        return self.fc2(kept) if positive else self.fc3(kept)


def test_value_dependent_model_is_traced_with_real_values():
    torch.manual_seed(0)
    model = _ValueDependent().eval()
    with torch.no_grad():
        model.fc1.bias.fill_(1.0)
    x = torch.randn(1, 10, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(NeedsValues):
        _trace(model, x, values=False)
    tr = trace(model, x)
    assert tr.output_shapes == [tuple(expected.shape)] and expected.shape[0] == 5
    assert {r.module for r in tr.macs} == {"fc1", "fc2"}  # the branch the real values take


def test_shape_only_checks_operands_like_the_real_kernels():
    with ShapeOnly():
        with pytest.raises(RuntimeError):
            torch.randn(3, 4) @ torch.randn(5, 6)
        with pytest.raises(RuntimeError):
            torch.addmm(torch.randn(7), torch.randn(3, 4), torch.randn(4, 6))
        with pytest.raises(RuntimeError):
            torch.bmm(torch.randn(2, 3, 4), torch.randn(3, 4, 5))
        with pytest.raises(RuntimeError, match="bias"):
            F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5))
        with pytest.raises(RuntimeError):
            F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3))
        with pytest.raises(RuntimeError):  # attention runs for real, so its checks are the real ones
            F.scaled_dot_product_attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 8))


@pytest.mark.parametrize("name", ["resnet18", "hf swin", "swin (windows, relative bias)"])
def test_shape_only_forward_gives_real_shapes_strides_and_dtypes(name):
    model, x = MODELS[name]()
    model.eval()
    seen = {}

    def record(tag):
        def hook(module, _inputs, out):
            t = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if isinstance(t, torch.Tensor):
                seen.setdefault(tag, []).append((module, tuple(t.shape), t.stride(), t.dtype))
        return hook

    for tag, wrap in (("real", None), ("shape", ShapeOnly)):
        handle = nn.modules.module.register_module_forward_hook(record(tag))
        try:
            with torch.no_grad(), (wrap() if wrap else contextlib.nullcontext()):
                model(**x) if isinstance(x, dict) else model(x)
        finally:
            handle.remove()
    assert seen["shape"] == seen["real"]
