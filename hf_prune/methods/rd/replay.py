"""Re-running a network from one layer on, for RD's distortion curves: prefix reuse and grid batching.

RD measures the *network's* output after changing one layer's weight, for many versions of that
weight. Every module call that finishes before the layer's first call computes exactly what it
computed in the unchanged network, so this module runs that prefix once and replays the rest:

1. :meth:`Replayer.trace` runs the model once and records every module call in start order (its
   parent call and how many calls its subtree holds). The calls that finish before a call ``i``
   starts and whose parent is still running are the **frontier** of ``i``: their outputs are all
   that the rest of the forward can read from the prefix (besides the model's raw inputs and
   parameters).
2. :meth:`Replayer.record` runs the model up to the first call of a layer, returning the cached
   outputs of the previous frontier instead of recomputing them, and keeps (a copy of) the outputs
   of the new frontier; it stops by raising an exception at that call. Over all the layers of a
   model these partial passes cost about one forward pass in total.
3. :meth:`Replayer.run` runs the model on the raw inputs repeated ``G`` times along the batch
   dimension; frontier calls return their cached outputs repeated the same way, the layer's call
   runs its own ``forward`` once per chunk of the batch with the weight of that chunk's variant,
   and every call after it runs on the ``G``-times larger batch. One call gives the network output
   for ``G`` weight variants, and the prefix is never recomputed.

What is exact: for a deterministic eval-mode forward whose module calls happen in the same order for
every input, the outputs are those of the plain forward pass, up to the floating-point differences
of running kernels at another batch size. What is assumed: modules before the layer have no side
effects that later code reads (a module that stores an attribute for a later module to use would see
its call skipped), and every tensor whose first dimension equals the calibration batch size is
batched along it. Callers check both on every layer: the variant equal to the unchanged weight must
reproduce the plain forward's output (:func:`hf_prune.methods.rd.curves.distortion_curves` does,
and falls back to plain forward passes for a layer that fails). A call order that differs from the
trace raises :class:`ReplayError`.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...core.inputs import call_model, logits_of

__all__ = ["Replayer", "ReplayError", "CacheModified", "CallTrace", "FrontierCache", "repeat_batch", "map_tensors"]


class ReplayError(RuntimeError):
    """The model's module calls did not follow the recorded trace (data-dependent control flow)."""


class CacheModified(ReplayError):
    """Code after a cached call changed its output in place; the cache must be rebuilt and copied
    before every use from now on (:attr:`Replayer.copy_cached`)."""


class _Stop(BaseException):
    """Ends a recording pass at the layer's first call (a BaseException, so that model code catching
    ``Exception`` does not swallow it)."""


@dataclass
class _Call:
    module: nn.Module
    parent: int  # index of the enclosing call, -1 for the outermost
    size: int = 1  # calls in this call's subtree, itself included (a contiguous range of indices)
    nbytes: int = 0  # bytes of the tensors it returned


class CallTrace:
    """The module calls of one forward pass, in start order (see the module docstring)."""

    def __init__(self, calls: list[_Call], batch: int):
        self.calls = calls
        self.batch = batch
        self.children: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            self.children.setdefault(c.parent, []).append(i)

    def first_call(self, module: nn.Module) -> int | None:
        return next((i for i, c in enumerate(self.calls) if c.module is module), None)

    def ancestors(self, i: int) -> list[int]:
        out = []
        p = self.calls[i].parent
        while p >= 0:
            out.append(p)
            p = self.calls[p].parent
        return out

    def frontier(self, i: int) -> list[int]:
        """Calls that end before call ``i`` starts and whose parent call encloses ``i``."""
        out = []
        for a in self.ancestors(i):
            out.extend(c for c in self.children.get(a, ()) if c + self.calls[c].size <= i)
        return sorted(out)

    def activation_bytes_per_sample(self) -> int:
        """The largest output of any call, per sample: a scale for the memory a batch row costs."""
        return max((c.nbytes for c in self.calls), default=0) // max(self.batch, 1)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj):
    """``obj`` with ``fn`` applied to every tensor in it (nested tuples, lists, namedtuples, mappings and
    ``ModelOutput``-like dicts keep their types)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(fn, v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:  # transformers' ModelOutput and other dict-like outputs keep their type
            return type(obj)(**items)
        except TypeError:
            return items
    return obj


def _nbytes(obj) -> int:
    total = 0

    def add(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_tensors(add, obj)
    return total


def repeat_batch(obj, times: int, batch: int):
    """Every tensor in ``obj`` whose first dimension is ``batch`` repeated ``times`` along it (a new
    tensor, memory format kept); other tensors copied, so the caller may change the result in place."""

    def rep(t: torch.Tensor) -> torch.Tensor:
        if times > 1 and t.dim() >= 1 and t.shape[0] == batch:
            return torch.cat([t] * times)
        return t.clone()

    return map_tensors(rep, obj)


def _detached_copy(obj):
    return map_tensors(lambda t: t.detach().clone(), obj)


def _versions(obj) -> list[int]:
    out: list[int] = []
    map_tensors(lambda t: out.append(t._version) or t, obj)
    return out


class FrontierCache:
    """The outputs of a call's frontier (``{call index: output}``) and the version counters of their
    tensors: a cached output is handed out without a copy, and an in-place change by the code that
    received it shows up as a changed version (:meth:`intact`)."""

    def __init__(self, outputs: dict | None = None):
        self.outputs = dict(outputs or {})
        self.versions = {i: _versions(o) for i, o in self.outputs.items()}

    def __contains__(self, i: int) -> bool:
        return i in self.outputs

    def __getitem__(self, i: int):
        return self.outputs[i]

    def intact(self) -> bool:
        return all(_versions(self.outputs[i]) == v for i, v in self.versions.items())


class _Tracer:
    def __init__(self):
        self.calls: list[_Call] = []
        self.stack: list[int] = []

    def call(self, module, forward, args, kwargs):
        i = len(self.calls)
        self.calls.append(_Call(module, self.stack[-1] if self.stack else -1))
        self.stack.append(i)
        try:
            out = forward(*args, **kwargs)
        finally:
            self.stack.pop()
        self.calls[i].size = len(self.calls) - i
        self.calls[i].nbytes = _nbytes(out)
        return out


class _Runner:
    """Follows the trace: cached calls return their outputs, ``stop`` ends the pass, ``layer`` runs
    through ``layer_fn``, ``capture`` calls keep a copy of what they return."""

    def __init__(self, owner: "Replayer", trace: CallTrace, cache: FrontierCache, *, repeat: int = 1, stop: int = -1,
                 capture=(), layer: int = -1, layer_fn=None):
        self.owner, self.trace, self.cache = owner, trace, cache
        self.repeat, self.stop, self.layer, self.layer_fn = repeat, stop, layer, layer_fn
        self.layer_module = trace.calls[layer].module if layer >= 0 else None
        self.capture = set(capture)
        self.captured: dict[int, object] = {}
        self.cursor = 0

    def call(self, module, forward, args, kwargs):
        i = self.cursor
        calls = self.trace.calls
        if i >= len(calls) or calls[i].module is not module:
            raise ReplayError(f"module call {i} is a {type(module).__name__}, not the "
                              f"{type(calls[i].module).__name__ if i < len(calls) else 'end of the pass'} "
                              "recorded in the trace")
        if i in self.cache:
            self.cursor += calls[i].size
            out = self.cache[i]
            if self.repeat > 1:
                return repeat_batch(out, self.repeat, self.trace.batch)  # new tensors
            return _detached_copy(out) if self.owner.copy_cached else out
        if i == self.stop:
            raise _Stop
        if self.layer >= 0 and i >= self.layer and module is self.layer_module:  # first call and any later one
            self.cursor += calls[i].size
            with self.owner.paused():  # the layer's own submodules (if any) run once per chunk
                return self.layer_fn(forward, args, kwargs)
        self.cursor += 1
        out = forward(*args, **kwargs)
        if i in self.capture:
            self.captured[i] = _detached_copy(out)
        return out


class Replayer:
    """Installs a thin wrapper around every module's ``forward`` of ``model`` (inside ``with
    replayer:``) so that passes can be traced, cut short and replayed; see the module docstring.
    Outside a pass the wrappers call the original ``forward`` unchanged.

    Cached outputs are handed out as they are (repeated along the batch when a pass runs several
    variants); ``copy_cached`` (set after a :class:`CacheModified`, and always in inference mode,
    where tensors keep no version counter) hands out copies instead."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.copy_cached = False
        self.trace_: CallTrace | None = None
        self._state = None
        self._saved: list[tuple[nn.Module, bool, object]] = []

    # ------------------------------------------------------------------ wrappers
    def __enter__(self) -> "Replayer":
        for module in self.model.modules():
            had = "forward" in module.__dict__
            original = module.forward
            self._saved.append((module, had, module.__dict__.get("forward")))
            module.forward = self._wrap(module, original)
        return self

    def __exit__(self, *exc) -> None:
        for module, had, value in reversed(self._saved):
            if had:
                module.forward = value
            else:
                module.__dict__.pop("forward", None)
        self._saved = []
        self._state = None

    def _wrap(self, module: nn.Module, forward):
        @functools.wraps(forward)  # keeps the signature that input dispatch (call_model) inspects
        def wrapped(*args, **kwargs):
            state = self._state
            if state is None:
                return forward(*args, **kwargs)
            return state.call(module, forward, args, kwargs)

        return wrapped

    @contextlib.contextmanager
    def _pass(self, state):
        self._state = state
        try:
            yield state
        finally:
            self._state = None

    @contextlib.contextmanager
    def paused(self):
        state, self._state = self._state, None
        try:
            yield
        finally:
            self._state = state

    # ------------------------------------------------------------------ passes
    def trace(self, inputs, batch: int) -> torch.Tensor:
        """Plain forward pass on ``inputs`` (``batch`` samples) that records the module calls; returns logits."""
        with self._pass(_Tracer()) as tracer:
            out = logits_of(call_model(self.model, inputs))
        self.trace_ = CallTrace(tracer.calls, batch)
        return out

    def record(self, inputs, upto: int, cache: FrontierCache) -> FrontierCache:
        """The outputs of the frontier of call ``upto``, computed from the previous ``cache`` on: a pass
        that stops when call ``upto`` starts. Raises :class:`CacheModified` if that pass changed a
        cached output in place."""
        trace = self._trace()
        self._check_mode()
        front = trace.frontier(upto)
        runner = _Runner(self, trace, cache, stop=upto, capture=[i for i in front if i not in cache])
        with self._pass(runner):
            try:
                call_model(self.model, inputs)
            except _Stop:
                pass
            else:
                raise ReplayError(f"call {upto} was never reached")
        if not cache.intact():
            raise CacheModified("a cached module output was changed in place by the code that received it")
        outputs = {i: cache[i] for i in front if i in cache}
        outputs.update(runner.captured)
        missing = [i for i in front if i not in outputs]
        if missing:
            raise ReplayError(f"frontier calls {missing[:3]} did not run before call {upto}")
        return FrontierCache(outputs)

    def run(self, inputs, cache: FrontierCache, *, layer: int, repeat: int, layer_fn) -> torch.Tensor:
        """Logits of a pass on ``inputs`` repeated ``repeat`` times, with ``cache`` (the frontier of
        call ``layer``) and ``layer_fn(forward, args, kwargs)`` in place of call ``layer`` (and of any
        later call of the same module). Raises :class:`CacheModified` as :meth:`record` does."""
        trace = self._trace()
        self._check_mode()
        runner = _Runner(self, trace, cache, repeat=repeat, layer=layer, layer_fn=layer_fn)
        with self._pass(runner):
            out = logits_of(call_model(self.model, repeat_batch(inputs, repeat, trace.batch)))
        if not cache.intact():
            raise CacheModified("a cached module output was changed in place by the code that received it")
        return out

    def _check_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            self.copy_cached = True  # inference tensors have no version counter to watch

    def _trace(self) -> CallTrace:
        if self.trace_ is None:
            raise ReplayError("Replayer.trace() must run first")
        return self.trace_
