"""Latency as a pruning target: a latency model built from measurements on the target device.

This module owns everything hf_prune knows about time:

* :class:`Settings` — where latency is measured: device, batch size, dtype, memory layout and
  CPU threads (defaults: the model's device, batch 1, the model's dtype, the inputs' layout, the
  current thread count).
* :class:`LatencyTable` — measured milliseconds by concrete layer shape, cached on disk as JSON
  (``$HF_HOME/hf_prune/latency`` or ``~/.cache/hf_prune/latency``), one file per device name,
  torch version, dtype, batch size, layout and thread count, so later runs reuse what was measured.
* :class:`LatencyModel` — the latency of a model for any choice of kept units of its
  :class:`~hf_prune.engine.graph.DependencyGraph`: the allocator
  (:func:`hf_prune.engine.allocation.allocate` with ``target_latency``) searches over it.
* :func:`measure_speedup` — dense against pruned, interleaved in one process: what every report
  states next to MACs, and what verifies a latency-targeted plan.

**How a model's latency is modelled.** Every convolution and linear layer the forward pass calls
is timed alone, as a micro-benchmark with its real input shape (batch scaled to the requested
batch size), its real kernel, stride, padding and groups, on the target device, at a grid of kept
input and output widths; between grid points the time is interpolated (bilinear), and with
``round_to="measured"`` the exact candidate widths are timed too. Everything else (norms,
activations, attention matmuls, data movement) is the *residual*: its share of a forward pass is
measured inside the same passes (hooks time the layers; the median per-pass share is kept, which
load does not bias). Part of it shrinks with the layers' output volume and part of it does not
(per-op overhead, work on pinned widths): the model is also compacted on the side to half of every
group, and the ratio of the two residuals, timed in turn, gives the fixed share.
Timing layers alone rather than hooking them inside the model's forward was chosen because the
table must cover widths the model does not have yet, and because a micro-benchmark of one op is
cheap to repeat many times, interleaved, which is what makes it robust on a loaded machine; what
it misses (cache effects between layers, the residual's real shape) is caught by measuring the
compacted model against the dense one. When the two disagree by more than 10 %, one correction
follows: the residual's fixed share (the part that does not shrink with the widths: per-op overhead,
the pinned stem's pooling, ...) is refit so that the prediction matches the measurement
(:meth:`LatencyModel.calibrate`), the budget is scaled by whatever error the refit leaves, and the
plan is made again and measured (:meth:`hf_prune.engine.pruner.StructuredPruner.plan`).

**Measuring.** Each timed sample runs an op enough times to last about a millisecond; samples of
all the points of a batch are taken round-robin (every round times each point once) so that slow
drifts of a shared machine hit all points alike; the lower quartile of the rounds is kept (other
work only ever adds time). Points timed after the grid are stored relative to their layer's grid
neighbours, timed again in the same batch (:meth:`LatencyModel.ensure`). On a CPU with one
intra-op thread the clock is the thread's own CPU time, which a loaded machine cannot inflate
(:attr:`Settings.clock_name`); otherwise wall time, with CUDA synchronised before each read. The
CPU thread count is part of the settings and is set for the duration of every measurement.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_int, check_number
from ..core.execution import eval_mode
from ..core.inputs import batch_size as batch_size_of
from ..core.inputs import call_model, first_tensor, model_device
from ..errors import ConfigError, PruningError

__all__ = ["Settings", "LatencyTable", "LatencyModel", "Layer", "Timer", "measure_speedup", "cache_dir",
           "find_layers", "TOLERANCE"]

TOLERANCE = 0.10  # a measured latency ratio further than this (relative) from the target is corrected once
CACHE_VERSION = 2


# ----------------------------------------------------------------------------------------------- settings
def cache_dir() -> Path:
    """Where latency tables live: ``$HF_HOME/hf_prune/latency``, else ``~/.cache/hf_prune/latency``."""
    home = os.environ.get("HF_HOME")
    return (Path(home) if home else Path.home() / ".cache") / "hf_prune" / "latency"


def device_name(device: torch.device) -> str:
    """A name that identifies the hardware: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _memory_format(model: nn.Module, example_inputs) -> str:
    """``"channels_last"`` when the 4-d input or a 4-d conv weight is in that layout, else ``"contiguous"``."""
    x = first_tensor(example_inputs)
    if x is not None and _is_channels_last(x):
        return "channels_last"
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and _is_channels_last(m.weight):
            return "channels_last"
    return "contiguous"


@dataclass(frozen=True)
class Settings:
    """Where and how latency is measured."""

    device: torch.device
    batch_size: int
    dtype: torch.dtype
    memory_format: str = "contiguous"
    threads: int = 1

    @property
    def clock_name(self) -> str:
        """``"thread"`` (the calling thread's CPU time) on a CPU with one intra-op thread, else ``"wall"``.

        With one thread every op runs in the calling thread, so its CPU time is the latency the op
        would have on an idle machine, and other work on a shared machine cannot inflate it (wall
        time measured while the thread waits for a core can be many times larger). With several
        threads, or on a GPU, only wall time (with synchronisation) measures latency.
        """
        return "thread" if self.device.type == "cpu" and self.threads == 1 else "wall"

    def clock(self) -> float:
        """Seconds, on the clock that :attr:`clock_name` names."""
        return time.thread_time() if self.clock_name == "thread" else time.perf_counter()

    @classmethod
    def of(cls, model: nn.Module, example_inputs=None, *, device=None, batch_size=None, dtype=None) -> "Settings":
        """Defaults: the model's device, batch 1, the model's dtype, the inputs' layout, current threads."""
        try:
            dev = torch.device(device) if device is not None else model_device(model)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"latency device={device!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"latency device={device!r} asks for CUDA, which this machine does not have")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        bs = check_int("batch_size", 1 if batch_size is None else batch_size,
                       meaning="the batch size latency is measured at")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"latency dtype={dtype!r} must be a floating torch.dtype (e.g. torch.bfloat16)")
        return cls(dev, bs, dtype or _model_dtype(model), _memory_format(model, example_inputs),
                   torch.get_num_threads())

    def context(self) -> dict:
        """What a measurement depends on besides the shapes (the key of a cache file)."""
        return {"version": CACHE_VERSION, "device": device_name(self.device), "device_type": self.device.type,
                "torch": torch.__version__, "dtype": str(self.dtype).replace("torch.", ""),
                "batch_size": self.batch_size, "memory_format": self.memory_format,
                "threads": self.threads if self.device.type == "cpu" else None, "clock": self.clock_name}

    def describe(self) -> dict:
        """JSON-able summary for reports."""
        c = self.context()
        return {"device": c["device"], "device_type": c["device_type"], "batch_size": self.batch_size,
                "dtype": c["dtype"], "memory_format": self.memory_format, "threads": c["threads"],
                "clock": self.clock_name}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _threads:
    """Run with ``n`` intra-op threads (the settings' count), whatever the caller set."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


# ----------------------------------------------------------------------------------------------- cache
class LatencyTable:
    """Measured milliseconds by concrete layer signature, for one measurement context.

    ``path=None`` keeps it in memory (tests inject tables this way). :meth:`save` merges with
    what another process may have written meanwhile and replaces the file atomically.
    """

    def __init__(self, context: dict, entries: dict | None = None, path: Path | None = None):
        self.context = dict(context)
        self.entries: dict[str, float] = dict(entries or {})
        self.path = path
        self._dirty = False

    @staticmethod
    def file_for(context: dict, directory: Path | None = None) -> Path:
        digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        slug = "".join(ch if ch.isalnum() else "-" for ch in f"{context['device']}-{context['dtype']}")[:60]
        return Path(directory or cache_dir()) / f"{slug}-b{context['batch_size']}-{digest}.json"

    @classmethod
    def load(cls, context: dict, directory: Path | None = None) -> "LatencyTable":
        path = cls.file_for(context, directory)
        entries = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("context") == context:  # a file for another context (hash collision) is ignored
                entries = {k: float(v) for k, v in data.get("entries", {}).items()}
        return cls(context, entries, path)

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = float(ms)
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        on_disk = LatencyTable.load(self.context, self.path.parent).entries
        on_disk.update(self.entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"context": self.context, "entries": on_disk}, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self.entries = on_disk
        self._dirty = False


# ----------------------------------------------------------------------------------------------- layers
@dataclass
class Layer:
    """One call of a convolution or linear layer, as the latency model times it.

    ``in_member`` / ``out_member`` index ``graph.members`` (None: that width never changes);
    ``in_follows_out``: a grouped convolution, whose input width follows its output width.
    """

    name: str
    kind: str  # "linear" or "conv1d" / "conv2d" / "conv3d"
    rows: int  # linear: tokens; conv: batch
    spatial: tuple  # conv input spatial size
    kernel: tuple
    stride: tuple
    padding: tuple | str
    dilation: tuple
    groups: int
    bias: bool
    dense_in: int
    dense_out: int
    out_tokens: int  # output elements per output channel (for the residual's volume)
    in_member: int | None = None
    out_member: int | None = None
    in_follows_out: bool = False

    def shape(self, cin: int, cout: int) -> tuple:
        """(input width, output width, groups) actually run for kept widths ``cin`` / ``cout``."""
        if self.groups == 1:
            return cin, cout, 1
        per_out = self.dense_out // self.groups
        g = max(1, round(cout / per_out))
        return g * (self.dense_in // self.groups), g * per_out, g

    def signature(self, cin: int, cout: int) -> str:
        cin, cout, g = self.shape(cin, cout)
        if self.kind == "linear":
            return f"linear|x={self.rows}x{cin}|w={cout}x{cin}|b={int(self.bias)}"
        dims = lambda t: "x".join(map(str, t)) if isinstance(t, tuple) else str(t)  # noqa: E731
        return (f"{self.kind}|x={self.rows}x{cin}x{dims(self.spatial)}|w={cout}x{cin // g}x{dims(self.kernel)}|"
                f"s={dims(self.stride)}|p={dims(self.padding)}|d={dims(self.dilation)}|g={g}|b={int(self.bias)}")

    def runner(self, cin: int, cout: int, settings: Settings):
        """A zero-argument callable running this layer once at the given widths."""
        cin, cout, g = self.shape(cin, cout)
        kw = {"device": settings.device, "dtype": settings.dtype}
        if self.kind == "linear":
            x, w = torch.randn(self.rows, cin, **kw), torch.randn(cout, cin, **kw)
            b = torch.randn(cout, **kw) if self.bias else None
            return lambda: nn.functional.linear(x, w, b)
        x = torch.randn(self.rows, cin, *self.spatial, **kw)
        w = torch.randn(cout, cin // g, *self.kernel, **kw)
        if settings.memory_format == "channels_last" and x.dim() == 4:
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(cout, **kw) if self.bias else None
        conv = getattr(nn.functional, self.kind)
        return lambda: conv(x, w, b, self.stride, self.padding, self.dilation, g)

    def bytes(self, cin: int, cout: int, settings: Settings) -> int:
        cin, cout, g = self.shape(cin, cout)
        size = torch.empty((), dtype=settings.dtype).element_size()
        return size * (self.rows * cin * math.prod(self.spatial) + cout * cin // g * math.prod(self.kernel)
                       + self.out_tokens * cout)


_CONVS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    for cls, kind in _CONVS.items():
        if isinstance(module, cls):
            return kind
    return None


def _calls(model: nn.Module, example_inputs) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """(name, module, input shape, output shape) of every conv/linear call of one forward pass."""
    from .graph.shape_only import NeedsValues, ShapeOnly

    calls = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module, args, out):
        x = first_tensor(args)
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            calls.append((names[id(module)], module, tuple(x.shape), tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _kind(m)]
    try:
        with torch.no_grad(), eval_mode(model):
            try:
                with ShapeOnly():
                    call_model(model, example_inputs)
            except (NeedsValues, Exception):  # the shape-only pass could not finish: run it for real
                calls.clear()
                call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def find_layers(model: nn.Module, graph, example_inputs, batch_size: int) -> list[Layer]:
    """The conv/linear calls of ``model`` on ``example_inputs``, scaled to ``batch_size``, mapped to
    the graph's members (the tensor dimensions whose widths pruning changes)."""
    scale = batch_size / max(1, batch_size_of(example_inputs))
    member_of = {(m.tensor, m.dim): i for i, m in enumerate(graph.members)}
    aliases = graph.trace.aliases
    layers = []
    for name, module, x_shape, y_shape in _calls(model, example_inputs):
        kind = _kind(module)
        weight = aliases.get(f"{name}.weight", f"{name}.weight")
        out_m, in_m = member_of.get((weight, 0)), member_of.get((weight, 1))
        if kind == "linear":
            rows = max(1, round(math.prod(x_shape[:-1]) * scale))
            layers.append(Layer(name, kind, rows, (), (), (), (), (), 1, module.bias is not None,
                                module.in_features, module.out_features,
                                max(1, round(math.prod(y_shape[:-1]) * scale)), in_m, out_m))
            continue
        if getattr(module, "transposed", False):  # not timed: its cost stays in the residual
            continue
        grouped = module.groups > 1
        layers.append(Layer(name, kind, max(1, round(x_shape[0] * scale)), tuple(x_shape[2:]),
                            tuple(module.kernel_size), tuple(module.stride), module.padding,
                            tuple(module.dilation), module.groups, module.bias is not None,
                            module.in_channels, module.out_channels,
                            max(1, round(x_shape[0] * scale)) * math.prod(y_shape[2:]),
                            None if grouped else in_m, out_m, grouped))
    return layers


# ----------------------------------------------------------------------------------------------- timing
class Timer:
    """Real measurements. Tests pass an object with the same methods that returns made-up times."""

    def __init__(self, rounds: int = 7, sample_ms: float = 1.0, max_bytes: int = 1 << 29):
        self.rounds, self.sample_ms, self.max_bytes = rounds, sample_ms, max_bytes

    def layers(self, jobs: list, settings: Settings) -> list[float]:
        """Milliseconds per ``(layer, cin, cout)`` job: median over rounds, round-robin in chunks
        whose tensors fit in ``max_bytes``."""
        out: list[float] = []
        chunk, size = [], 0
        with torch.inference_mode(), _threads(settings.threads):
            for job in jobs:
                need = job[0].bytes(job[1], job[2], settings)
                if chunk and size + need > self.max_bytes:
                    out += self._round_robin(chunk, settings)
                    chunk, size = [], 0
                chunk.append(job)
                size += need
            if chunk:
                out += self._round_robin(chunk, settings)
        return out

    def _round_robin(self, jobs: list, settings: Settings) -> list[float]:
        runs, inner = [], []
        for layer, cin, cout in jobs:
            run = layer.runner(cin, cout, settings)
            run()  # warm-up: allocations, kernel selection
            _sync(settings.device)
            t0 = settings.clock()
            run()
            _sync(settings.device)
            one = (settings.clock() - t0) * 1000
            runs.append(run)
            inner.append(max(1, min(100, int(self.sample_ms / max(one, 1e-4)))))
        samples = [[] for _ in jobs]
        for _ in range(self.rounds):
            for i, (run, n) in enumerate(zip(runs, inner)):
                _sync(settings.device)
                t0 = settings.clock()
                for _ in range(n):
                    run()
                _sync(settings.device)
                samples[i].append((settings.clock() - t0) * 1000 / n)
        return [low_quartile(s) for s in samples]

    def residual(self, models: list, inputs, settings: Settings) -> tuple[float, list[float]]:
        """Time spent outside the conv and linear layers, measured inside the forward passes: hooks
        time the layers of ``models`` (already at the settings), which run in turn every round.
        Returns the median per-pass share of the first model's time spent outside its layers, and
        for every other model the median per-round ratio of its time outside the layers to the
        first's. Shares and ratios taken within a pass or a round are not biased by load, unlike
        differences between separately measured times."""
        inside = [0.0]

        def pre(*_):
            _sync(settings.device)
            inside.append(settings.clock())

        def post(*_):
            _sync(settings.device)
            inside[0] += settings.clock() - inside.pop()

        handles = [h for model in models for m in model.modules() if _kind(m)
                   for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        rounds = []
        try:
            with torch.inference_mode(), _threads(settings.threads):
                for r in range(2 + 2 * self.rounds):
                    outside = []
                    for model in models:
                        inside[:] = [0.0]
                        _sync(settings.device)
                        t0 = settings.clock()
                        call_model(model, inputs)
                        _sync(settings.device)
                        total = max(settings.clock() - t0, 1e-9)
                        outside.append((total - inside[0], total))
                    if r >= 2:  # the first rounds warm up
                        rounds.append(outside)
        finally:
            for h in handles:
                h.remove()
        share = statistics.median(o[0][0] / o[0][1] for o in rounds)
        ratios = [statistics.median(o[k][0] / max(o[0][0], 1e-9) for o in rounds) for k in range(1, len(models))]
        return min(0.95, max(0.0, share)), ratios

    def interleaved(self, models: list, inputs, settings: Settings, *, iters: int | None = None,
                    warmup: int = 2, max_seconds: float = 20.0) -> list[list[float]]:
        """Times (ms) of each model, alternating the order every round; ``iters=None`` fits the number
        of rounds (7 to 100) into about ``max_seconds``."""
        times = [[] for _ in models]
        with torch.inference_mode(), _threads(settings.threads):
            for m in models:
                for _ in range(warmup):
                    call_model(m, inputs)
            if iters is None:
                t0 = time.perf_counter()  # the number of rounds is budgeted in wall time
                self._round(models, inputs, settings, [[] for _ in models], 0)
                per_round = time.perf_counter() - t0
                iters = int(max(7, min(100, max_seconds / max(per_round, 1e-6))))
            for r in range(iters):
                self._round(models, inputs, settings, times, r)
        return times

    @staticmethod
    def _round(models, inputs, settings, times, r) -> None:
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            _sync(settings.device)
            t0 = settings.clock()
            call_model(models[i], inputs)
            _sync(settings.device)
            times[i].append((settings.clock() - t0) * 1000)


def low_quartile(samples: list) -> float:
    """The lower quartile: interference from other work only ever adds time, so the low end of the
    samples estimates the undisturbed time better than their median (and less jumpily than the minimum)."""
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 4]


def _inputs_at(example_inputs, settings: Settings):
    """The example inputs with the settings' batch size, device, dtype (floating tensors) and layout."""
    b0 = max(1, batch_size_of(example_inputs))

    def convert(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() and t.shape[0] == b0 and settings.batch_size != b0:
            t = t[torch.arange(settings.batch_size) % b0]
        t = t.to(settings.device, dtype=settings.dtype if t.is_floating_point() else None)
        if settings.memory_format == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def walk(x):
        if isinstance(x, dict) or (hasattr(x, "keys") and not isinstance(x, torch.Tensor)):
            return {k: walk(v) for k, v in dict(x).items()}
        if isinstance(x, (tuple, list)):
            return type(x)(walk(v) for v in x)
        return convert(x)

    return walk(example_inputs)


def _model_at(model: nn.Module, settings: Settings) -> nn.Module:
    """``model`` itself when it already is at the settings, else a converted copy (the caller's
    model is never moved or cast)."""
    same = model_device(model) == settings.device and _model_dtype(model) == settings.dtype
    fmt = _memory_format(model, None)
    if same and (settings.memory_format == fmt or not any(isinstance(m, nn.Conv2d) for m in model.modules())):
        return model
    m = copy.deepcopy(model).to(settings.device, dtype=settings.dtype)
    if settings.memory_format == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    return m


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def measure_speedup(dense: nn.Module, pruned: nn.Module, example_inputs, *, device=None, batch_size: int = 1,
                    dtype: torch.dtype | None = None, iters: int | None = None, max_seconds: float = 20.0,
                    timer: Timer | None = None) -> dict:
    """Latency of ``pruned`` against ``dense`` in this process, interleaved (each round runs both, in
    alternating order), on ``device`` (default: the dense model's) at ``batch_size`` and ``dtype``
    (default: the dense model's), eval mode, ``torch.inference_mode``. The layout follows the inputs
    (a channels_last 4-d input, or a channels_last conv weight, times both models in channels_last).

    Returns ``{"latency_ratio", "speedup", "device", "batch_size", "dtype", "dense_ms", "pruned_ms",
    "memory_format", "threads", "clock", "iterations", "load"}``: ``latency_ratio`` is the median of the
    per-round ratios pruned / dense (robust to load that changes between rounds), ``speedup`` its
    inverse, ``dense_ms`` / ``pruned_ms`` the medians; ``load`` is the 1/5/15-minute load average
    at the end (CPU timings on a loaded machine say so); ``clock`` is ``"thread"`` (CPU time of the
    calling thread, on a CPU with one intra-op thread: not inflated by load) or ``"wall"``. Neither
    model is moved or changed: when
    the settings differ from a model's own, a converted copy is timed.
    """
    settings = Settings.of(dense, example_inputs, device=device, batch_size=batch_size, dtype=dtype)
    return _speedup(dense, pruned, example_inputs, settings, timer or Timer(), iters=iters,
                    max_seconds=max_seconds)


def _speedup(dense, pruned, example_inputs, settings: Settings, timer, *, iters=None, max_seconds=20.0) -> dict:
    x = _inputs_at(example_inputs, settings)
    a, b = _model_at(dense, settings), _model_at(pruned, settings)
    with eval_mode(a), eval_mode(b):
        d, p = timer.interleaved([a, b], x, settings, iters=iters, max_seconds=max_seconds)
    ratio = statistics.median(pi / di for pi, di in zip(p, d))
    return {"latency_ratio": ratio, "speedup": 1.0 / ratio, **settings.describe(),
            "dense_ms": statistics.median(d), "pruned_ms": statistics.median(p), "iterations": len(d),
            "load": _load()}


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class _Grid:
    """Grid widths of one layer and the (monotone) times at them."""

    ins: list
    outs: list
    ms: list = field(default_factory=list)  # ms[i][j] at (ins[i], outs[j])


def _bracket(xs: list, v: float) -> tuple[int, int, float]:
    """Indices around ``v`` in sorted ``xs`` and the weight of the upper one (clamped at the ends)."""
    if len(xs) == 1 or v <= xs[0]:
        return 0, 0, 0.0
    if v >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    hi = next(i for i, x in enumerate(xs) if x >= v)
    return hi - 1, hi, (v - xs[hi - 1]) / (xs[hi] - xs[hi - 1])


def _grid_widths(lo: int, hi: int, points: int) -> list:
    """``points`` widths from ``lo`` to ``hi``, inner ones on multiples of 8 (the widths rounding picks)."""
    if hi <= lo:
        return [hi]
    inner = {max(lo, min(hi, int(round((lo + (hi - lo) * k / (points - 1)) / 8)) * 8)) for k in range(1, points - 1)}
    return sorted({lo, hi} | inner)


class LatencyModel:
    """Predicted latency (ms) of a model for any kept units of its graph, from measurements.

    ``predict(keep)`` = Σ layer time at its kept widths + residual × kept output volume / dense
    output volume (see the module docstring). Built lazily by :meth:`build`; ``timer`` and
    ``table`` can be injected (tests use made-up times, no clock).
    """

    def __init__(self, model: nn.Module, graph, example_inputs, settings: Settings, *, timer=None,
                 table: LatencyTable | None = None, grid: int = 5, cache: bool = True, verify_seconds: float = 20.0):
        self.model, self.graph, self.example_inputs, self.settings = model, graph, example_inputs, settings
        self.timer = timer or Timer()
        self.table = table if table is not None else (
            LatencyTable.load(settings.context()) if cache else LatencyTable(settings.context()))
        self.grid_points = check_int("grid", grid, minimum=2, meaning="grid widths per layer dimension")
        self.verify_seconds = check_number("verify_seconds", verify_seconds, positive=True,
                                           meaning="about how long a plan is timed against the dense model")
        self.layers: list[Layer] = []
        self.grids: list[_Grid] = []
        self.residual_share = None
        self.residual_ms = 0.0
        self.fixed_share = 0.0  # of the residual: measured at build, refit from a verified plan (calibrate)
        self.measured = 0  # layer points timed by this model (not taken from the cache)
        self.seconds = 0.0

    # -------------------------------------------------------------- building
    def build(self) -> "LatencyModel":
        if self.layers:
            return self
        t0 = time.perf_counter()
        self.layers = find_layers(self.model, self.graph, self.example_inputs, self.settings.batch_size)
        if not self.layers:
            raise PruningError("target_latency: the model calls no Conv/Linear layer whose time could be measured")
        lo = self._width_bounds()
        self.grids = []
        for layer in self.layers:
            ins = [layer.dense_in] if layer.in_member is None else _grid_widths(lo[layer.in_member], layer.dense_in,
                                                                                 self.grid_points)
            outs = [layer.dense_out] if layer.out_member is None else _grid_widths(
                lo[layer.out_member], layer.dense_out, self.grid_points)
            self.grids.append(_Grid(ins, outs))
        self.ensure([(i, a, b) for i, g in enumerate(self.grids) for a in g.ins for b in g.outs], relative=False)
        for i, g in enumerate(self.grids):
            g.ms = self._monotone([[self.exact(i, a, b) for b in g.outs] for a in g.ins], g.ins, g.outs)
        self.dense_volume = sum(l.out_tokens * l.dense_out for l in self.layers)
        self.residual_share, self.fixed_share = self._measure_residual()
        layers_ms = sum(self.layer_ms(i, l.dense_in, l.dense_out) for i, l in enumerate(self.layers))
        self.residual_ms = layers_ms * self.residual_share / (1 - self.residual_share)
        self.table.save()
        self.seconds = time.perf_counter() - t0
        return self

    def _width_bounds(self) -> dict:
        """Smallest width of every member the layers use (every group at one head or 8 channels)."""
        group_of = torch.full((self.graph.trace.uf.size,), -1, dtype=torch.int64)
        for gi, g in enumerate(self.graph.groups):
            group_of[g.units] = gi
        lo = {}
        for layer in self.layers:
            for m in (layer.in_member, layer.out_member):
                if m is None or m in lo:
                    continue
                units = self.graph.members[m].units
                owner = group_of[units]
                fixed = int((owner < 0).sum())
                smallest = fixed
                for gi in torch.unique(owner[owner >= 0]).tolist():
                    mult = torch.unique(units[owner == gi], return_counts=True)[1].max()
                    smallest += int(mult) * (8 if self.graph.groups[gi].kind == "channel" else 1)
                lo[m] = max(1, min(smallest, units.numel()))
        return lo

    @staticmethod
    def _monotone(ms: list, ins: list, outs: list) -> list:
        """Grid times made plausible: a width that grows by a factor r grows the time by at most 1.25 r,
        and a width that shrinks never grows the time. Interference only adds time, so an outlier is a
        slow sample: the first rule caps one at a large width (which would make the first cut look
        like a large saving), the second pulls one at a small width down to the times above it."""
        ms = [row[:] for row in ms]
        for i in range(len(ms)):
            for j in range(len(ms[0])):
                caps = [ms[i][j]]
                caps += [ms[i - 1][j] * 1.25 * ins[i] / ins[i - 1]] if i else []
                caps += [ms[i][j - 1] * 1.25 * outs[j] / outs[j - 1]] if j else []
                ms[i][j] = min(caps)
        for i in reversed(range(len(ms))):
            for j in reversed(range(len(ms[0]))):
                above = [ms[i + 1][j]] if i + 1 < len(ms) else []
                above += [ms[i][j + 1]] if j + 1 < len(ms[0]) else []
                ms[i][j] = min([ms[i][j]] + above)
        return ms

    def _measure_residual(self) -> tuple[float, float]:
        """(share of the dense model's time outside its layers, fixed share of that residual), cached.

        The fixed share comes from the model compacted on the side to half of every group (the
        residual of both, timed in turn): ``a`` in ``residual(half) = residual(dense) × (a + (1 − a) ×
        volume ratio)``. 0 when that half model cannot be made or run (its cost then shrinks with volume
        until a verified plan refits it)."""
        key = hashlib.sha256("\n".join(l.signature(l.dense_in, l.dense_out) for l in self.layers).encode()
                             ).hexdigest()[:24] + f"|{type(self.model).__name__}"
        cached = self.table.get("residual|" + key), self.table.get("residual_fixed|" + key)
        if None not in cached:
            return cached
        half, keep = self._half_model()
        models = [_model_at(self.model, self.settings)] + ([_model_at(half, self.settings)] if half else [])
        with contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(eval_mode(m))
            share, ratios = self.timer.residual(models, _inputs_at(self.example_inputs, self.settings), self.settings)
        fixed = 0.0
        if ratios:
            volume = self._volume(self.widths(keep))
            fixed = min(1.0, max(0.0, (ratios[0] - volume) / (1 - volume))) if volume < 1 else 0.0
        self.table.put("residual|" + key, share)
        self.table.put("residual_fixed|" + key, fixed)
        return share, fixed

    def _half_model(self):
        """A copy of the model with every group at half its units (whole heads, multiples of 8
        channels), and its keep mask; (None, None) if that model cannot be compacted or run."""
        from .surgery import compact_units

        keep = self.graph.keep_mask()
        for g in self.graph.groups:
            n = len(g)
            k = max(8, n // 2 // 8 * 8) if g.kind == "channel" and n > 8 else max(1, n // 2)
            keep[g.units[k:]] = False
        try:
            undo = compact_units(self.model, self.graph, keep)
        except PruningError:
            return None, None
        try:
            half = copy.deepcopy(self.model)
        finally:
            undo.restore()
        try:
            with torch.no_grad(), eval_mode(half):
                call_model(half, self.example_inputs)
        except Exception:  # noqa: BLE001 - a layer reads a width the trace cannot see: no calibration
            return None, None
        return half, keep

    def _volume(self, widths: list) -> float:
        """Output volume of the layers at ``widths`` relative to the dense model."""
        return sum(l.out_tokens * w[1] for l, w in zip(self.layers, widths)) / max(self.dense_volume, 1)

    # -------------------------------------------------------------- measuring and looking up
    def ensure(self, points: list, *, relative: bool = True) -> int:
        """Time every ``(layer index, cin, cout)`` not in the table yet; returns how many were timed.

        A point timed after the grid (a candidate width, a plan's widths) may see other conditions
        than the grid did: other load, and warmer caches in a small batch than in the grid's long
        round-robin. So the grid points around it, on its layer, are timed again in the same batch,
        and the point is stored as the grid's (monotone) interpolation times its ratio to the
        interpolation of those re-timed neighbours: only its departure from its neighbours is taken
        from the new batch (``relative=False``: the grid itself, stored as timed)."""
        todo, seen = [], set()
        for i, a, b in points:
            key = self.layers[i].signature(a, b)
            if self.table.get(key) is None and key not in seen:
                seen.add(key)
                todo.append((i, a, b))
        if not todo:
            return 0
        refs = sorted({c for i, a, b in todo for c in self._corners(i, a, b)}) if relative else []
        jobs = [(self.layers[i], a, b) for i, a, b in refs + todo]
        times = dict(zip(refs + todo, self.timer.layers(jobs, self.settings)))
        for i, a, b in todo:
            ms = times[(i, a, b)]
            if refs:
                again = self._interpolate(i, a, b, lambda gi, gj: times[(i, self.grids[i].ins[gi], self.grids[i].outs[gj])])
                ms *= self.layer_ms(i, a, b, exact=False) / max(again, 1e-12)
            self.table.put(self.layers[i].signature(a, b), ms)
        self.measured += len(todo)
        self.table.save()
        return len(todo)

    def forget(self, points: list) -> None:
        """Drop the exact times of ``(layer index, cin, cout)`` points off their layer's grid (to time them
        again independently of the batch that chose them)."""
        for i, a, b in points:
            g = self.grids[i]
            if not (a in g.ins and b in g.outs):
                self.table.entries.pop(self.layers[i].signature(a, b), None)

    def _corners(self, i: int, cin: int, cout: int) -> set:
        g = self.grids[i]
        i0, i1, _ = _bracket(g.ins, cin)
        j0, j1, _ = _bracket(g.outs, cout)
        return {(i, g.ins[a], g.outs[b]) for a in (i0, i1) for b in (j0, j1)}

    def _interpolate(self, i: int, cin: int, cout: int, value) -> float:
        """Bilinear interpolation at (cin, cout) of ``value(grid in index, grid out index)``."""
        g = self.grids[i]
        i0, i1, wi = _bracket(g.ins, cin)
        j0, j1, wj = _bracket(g.outs, cout)
        top = value(i0, j0) * (1 - wj) + value(i0, j1) * wj
        bottom = value(i1, j0) * (1 - wj) + value(i1, j1) * wj
        return top * (1 - wi) + bottom * wi

    def exact(self, i: int, cin: int, cout: int) -> float | None:
        return self.table.get(self.layers[i].signature(cin, cout))

    def layer_ms(self, i: int, cin: int, cout: int, *, exact: bool = True) -> float:
        """Time of layer ``i`` at the given widths: the exact measurement when there is one off the grid
        (measured rounding times candidates; another layer of the same shape may have it on its grid),
        else bilinear between the grid's (monotone) times."""
        g = self.grids[i]
        if exact and not (cin in g.ins and cout in g.outs):
            t = self.exact(i, cin, cout)
            if t is not None:
                return t
        return self._interpolate(i, cin, cout, lambda a, b: g.ms[a][b])

    def residual(self, volume: float, dense_volume: float) -> float:
        """The residual's part carried by a layer whose output volume is ``volume`` (``dense_volume`` in
        the dense model): a ``fixed_share`` of it does not shrink, the rest shrinks with the volume."""
        a = self.fixed_share
        return self.residual_ms * (a * dense_volume + (1 - a) * volume) / max(self.dense_volume, 1)

    def calibrate(self, keep: torch.Tensor, measured_ratio: float) -> float:
        """Refit the residual's fixed share so that the prediction for ``keep`` equals ``measured_ratio``
        (clamped to [0, 1]); returns the error left: measured / predicted after the refit (1.0 when the
        refit explains it all)."""
        ws = self.widths(keep)
        layers = sum(self.layer_ms(i, *w) for i, w in enumerate(ws))
        volume = self._volume(ws)
        wanted = measured_ratio * self.predict(None) - layers  # residual the measurement implies
        if self.residual_ms > 0 and volume < 1:
            share = (wanted / self.residual_ms - volume) / (1 - volume)
            self.fixed_share = min(1.0, max(0.0, share))
        return measured_ratio / self.ratio(keep)

    # -------------------------------------------------------------- whole-model predictions
    def widths(self, keep: torch.Tensor) -> list[tuple[int, int]]:
        """(input, output) width of every layer when the units with ``keep[root]`` stay."""
        def width(m, dense):
            return dense if m is None else int(keep[self.graph.members[m].units].sum())

        out = []
        for layer in self.layers:
            cout = width(layer.out_member, layer.dense_out)
            cin = cout * layer.dense_in // layer.dense_out if layer.in_follows_out else width(layer.in_member,
                                                                                               layer.dense_in)
            out.append((cin, cout))
        return out

    def predict(self, keep: torch.Tensor | None = None) -> float:
        """Predicted milliseconds of the model with the units ``keep`` (None: dense)."""
        self.build()
        if keep is None:
            keep = self.graph.keep_mask()
        ws = self.widths(keep)
        return sum(self.layer_ms(i, *w) + self.residual(l.out_tokens * w[1], l.out_tokens * l.dense_out)
                   for i, (l, w) in enumerate(zip(self.layers, ws)))

    def ratio(self, keep: torch.Tensor) -> float:
        return self.predict(keep) / self.predict(None)

    def summary(self) -> dict:
        return {**self.settings.describe(), "layers": len(self.layers),
                "predicted_dense_ms": self.predict(None), "residual_share": self.residual_share,
                "residual_fixed_share": self.fixed_share, "points_measured": self.measured, "build_s": round(self.seconds, 2),
                "table_file": self.table.path.name if self.table.path else None}

    # -------------------------------------------------------------- verification
    def measure_plan(self, compacted: nn.Module) -> dict:
        """Dense (this model's) against ``compacted``, interleaved, at the settings, for about
        ``verify_seconds`` (7 to 100 rounds)."""
        return _speedup(self.model, compacted, self.example_inputs, self.settings, self.timer,
                        max_seconds=self.verify_seconds)
