"""Measuring a model: parameter count, MACs and measured latency.

This module owns every number that hf_prune reports about a model's size and speed:

* ``params`` / ``nonzero_params`` — all parameters, and those that are not exactly zero
  (the latter shows unstructured sparsity, which does not shrink tensors);
* ``macs`` — multiply-accumulates of one forward pass over the given inputs (the whole batch),
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` (``flops // 2``);
* ``latency_ms`` — the median wall-clock time of timed forward passes after warm-up.

MACs are not speed: reports always put the measured latency beside them,
and :func:`compare` states the speed-up as a ratio of latencies measured in the same process.

Inputs may be a tensor (``model(x)``), a tuple/list of tensors (``model(*xs)``) or a mapping of
keyword arguments (``model(**{"pixel_values": x})``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.execution import eval_mode
from ..core.inputs import model_device

__all__ = ["ProfileReport", "profile", "compare", "time_model", "count_params", "count_macs"]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tensor / tuple / list / mapping."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        values = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


# --------------------------------------------------------------------------------------------
# counting and timing
# --------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return ``(params, nonzero_params)``; shared parameters are counted once."""
    total = 0
    nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()).item())
    return total, nonzero


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q K^T) V: two batched matmuls (shapes ``(..., L, E)``, ``(..., S, Ev)``)."""
    *batch, q_len, q_dim = query_shape
    k_len = key_shape[-2]
    v_dim = value_shape[-1]
    b = 1
    for d in batch:
        b *= int(d)
    return 2 * b * q_len * k_len * q_dim + 2 * b * q_len * k_len * v_dim


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas that FlopCounterMode lacks.

    On CPU, ``F.scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's registry does not count
    (up to at least torch 2.14): attention would silently count as 0 MACs.
    """
    from torch.utils import flop_counter

    extra: dict[Any, Any] = {}
    packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if packet is not None and packet not in flop_counter.flop_registry:
        extra[packet] = _sdpa_flops
    return extra


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one forward pass on ``example_inputs`` (whole batch), as FLOPs // 2.

    Counts matrix multiplications, convolutions and attention (what FlopCounterMode counts);
    elementwise ops, norms and softmax are not counted. Runs in eval mode under
    ``torch.inference_mode``; the model's training mode is restored.
    Inputs must already be on the model's device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # nn.MultiheadAttention / nn.TransformerEncoderLayer take a fused "fast path" in inference
    # (aten._native_multi_head_attention, aten._transformer_encoder_layer_fwd) that the counter
    # cannot see into; switch it off while counting so the same math is counted op by op.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
        with eval_mode(model), torch.inference_mode(), counter:
            _forward(model, example_inputs)
        return int(counter.get_total_flops()) // 2
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def time_model(
    model: nn.Module, example_inputs: Any, warmup: int = 3, iters: int = 10
) -> list[float]:
    """Time ``iters`` forward passes after ``warmup`` untimed ones; return each one in ms.

    Runs under ``torch.inference_mode`` but does not change the model's train/eval mode (call
    ``model.eval()`` first for inference timings). Inputs must already be on the model's device.
    CUDA (and MPS) work is synchronised before each clock read.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    first = _first_tensor(example_inputs)
    device = first.device if first is not None else model_device(model)
    timings: list[float] = []
    with torch.inference_mode():
        for _ in range(max(0, warmup)):
            _forward(model, example_inputs)
        _synchronize(device)
        for _ in range(iters):
            start = time.perf_counter()
            _forward(model, example_inputs)
            _synchronize(device)
            timings.append((time.perf_counter() - start) * 1000.0)
    return timings


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _human(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    value = float(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}{unit}".rstrip()
    if value == int(value):
        return f"{int(value)} {unit}".rstrip()
    return f"{value:.2f} {unit}".rstrip()


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g} ms" if value < 10 else f"{value:.1f} ms"


@dataclass
class ProfileReport:
    """What :func:`profile` measured. ``macs`` is for the whole batch of the example inputs."""

    params: int
    nonzero_params: int
    macs: int
    latency_ms: float | None
    batch_size: int
    device: str

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are exactly zero."""
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    @property
    def macs_per_sample(self) -> float:
        return self.macs / max(1, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [("Params", _human(self.params))]
        if self.nonzero_params != self.params:
            rows.append(
                ("Nonzero", f"{_human(self.nonzero_params)} ({100 * self.sparsity:.1f}% sparse)")
            )
        rows.append(("MACs", _human(self.macs)))
        latency = _ms(self.latency_ms)
        rows.append(("Latency", f"{latency} (batch {self.batch_size}, {self.device})"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    warmup: int = 3,
    iters: int = 10,
    device: str | torch.device | None = None,
    measure_latency: bool = True,
) -> ProfileReport:
    """Count parameters and MACs of ``model`` and measure its latency on ``example_inputs``.

    ``example_inputs``: a tensor, a tuple/list of positional tensors, or a mapping of keyword
    arguments (e.g. ``{"pixel_values": x}``). ``device``: where to measure; by default the
    device of the model's parameters. If it differs, the model is moved there for the
    measurement and moved back afterwards. The forward passes run in eval mode under
    ``torch.inference_mode``; the model's training mode is restored on return.
    Latency is the median of ``iters`` timed passes after ``warmup`` passes
    (``None`` when ``measure_latency=False``).
    """
    original_device = model_device(model)
    target = torch.device(device) if device is not None else original_device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())

    inputs = _map_tensors(example_inputs, lambda t: t.to(target))
    first = _first_tensor(inputs)
    batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    moved = target != original_device
    if moved:
        model.to(target)
    try:
        with eval_mode(model):
            params, nonzero = count_params(model)
            macs = count_macs(model, inputs)
            latency = None
            if measure_latency:
                latency = statistics.median(time_model(model, inputs, warmup=warmup, iters=iters))
    finally:
        if moved:
            model.to(original_device)

    return ProfileReport(
        params=params,
        nonzero_params=nonzero,
        macs=macs,
        latency_ms=latency,
        batch_size=batch_size,
        device=str(target),
    )


def compare(before: ProfileReport, after: ProfileReport) -> str:
    """Before/after table. Ratios are after/before, except latency: speed-up = before/after."""

    def ratio(a: float | None, b: float | None) -> str:
        if a is None or b is None or b == 0:
            return "n/a"
        return f"{a / b:.2f}x"

    def _speedup(a: float | None, b: float | None) -> str:
        r = ratio(a, b)
        return r if r == "n/a" else f"{r} speed-up"

    rows = [
        ("", "before", "after", "ratio"),
        ("Params", _human(before.params), _human(after.params), ratio(after.params, before.params)),
    ]
    if before.nonzero_params != before.params or after.nonzero_params != after.params:
        rows.append(
            (
                "Nonzero",
                _human(before.nonzero_params),
                _human(after.nonzero_params),
                ratio(after.nonzero_params, before.nonzero_params),
            )
        )
    rows.append(("MACs", _human(before.macs), _human(after.macs), ratio(after.macs, before.macs)))
    rows.append(
        (
            "Latency",
            _ms(before.latency_ms),
            _ms(after.latency_ms),
            _speedup(before.latency_ms, after.latency_ms),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
        for r in rows
    ]
    if before.batch_size != after.batch_size or before.device != after.device:
        lines.append(
            f"warning: measured at different settings (batch {before.batch_size} on "
            f"{before.device} vs batch {after.batch_size} on {after.device})"
        )
    else:
        lines.append(f"(batch {before.batch_size}, {before.device})")
    return "\n".join(lines)


def paired_latency(models: list, inputs, *, rounds: int = 5, iters: int = 10, warmup: int = 3) -> list[float]:
    """Median latency (ms) of each model, timed in alternating rounds in this process.

    Alternating the models round by round spreads load changes on a shared machine over all of
    them, so the ratio between them is fairer than timing one model after the other.
    """
    import statistics

    times: list[list[float]] = [[] for _ in models]
    for m in models:
        time_model(m, inputs, warmup=max(0, warmup - 1), iters=1)  # warm-up (first call not kept)
    for _ in range(rounds):
        for i, m in enumerate(models):
            times[i].extend(time_model(m, inputs, warmup=1, iters=iters))
    return [statistics.median(t) for t in times]


def threads_text(n: int) -> str:
    """How a CPU measurement ran, for reports: ``CPU, 2 threads``."""
    return f"CPU, {n} thread{'' if n == 1 else 's'}"
