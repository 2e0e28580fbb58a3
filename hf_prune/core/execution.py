"""How hf_prune runs a model: train/eval modes, intra-op threads, BatchNorm recalibration.

Every engine pass and every method that evaluates a model goes through these, so that modules get
their own modes back, eval-mode caches never go stale, and tiny bookkeeping ops do not pay for
thread barriers.
"""
from __future__ import annotations

import contextlib
import functools

import torch


_outer_threads: list[int] = []  # thread counts of the callers of the active single_threaded blocks


@contextlib.contextmanager
def single_threaded():
    """Run many tiny tensor ops on one thread.

    The engine's bookkeeping is thousands of small indexing ops; with several intra-op threads each
    one pays a parallel-region barrier, which on a busy machine costs milliseconds per op.
    """
    before = torch.get_num_threads()
    _outer_threads.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _outer_threads.pop()
        torch.set_num_threads(before)


@contextlib.contextmanager
def caller_threads():
    """Inside :func:`single_threaded`, run a heavy op (a model's matmul) with the caller's threads."""
    if not _outer_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_outer_threads[0])
    try:
        yield
    finally:
        torch.set_num_threads(before)


def module_modes(model: torch.nn.Module) -> list:
    """Every module's train/eval mode, for :func:`restore_modes` (``model.train(was_training)``
    would flatten them: a model training with frozen BatchNorms would lose that)."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list) -> None:
    for m, mode in modes:
        m.training = mode  # not train(): that would flatten the modes of the submodules again


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for a while; afterwards every module has its own mode back."""
    modes = module_modes(model)
    model.eval()
    try:
        yield
    finally:
        restore_modes(modes)


def flush_eval_caches(model: torch.nn.Module) -> None:
    """Let modules drop what they cached from their parameters in eval mode; modes are unchanged.

    Modules that cache (LeViT's attention biases, some timm attention layers) drop it in
    ``train()``, so that is called and every module's mode put back.
    """
    modes = module_modes(model)
    model.train(True)
    restore_modes(modes)


@contextlib.contextmanager
def eval_pass(model: torch.nn.Module):
    """One of the engine's forward passes: in eval mode, with nothing cached before or after it.

    A cache made before the pass would hide its parameter from the trace, and one made during it
    (by a compacted-then-restored model, or from a shape-only pass's zeros) would be stale after.
    """
    flush_eval_caches(model)
    with eval_mode(model):
        try:
            yield
        finally:
            flush_eval_caches(model)


def single_threaded_fn(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded():
            return fn(*args, **kwargs)
    return wrapper


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, bns, batches, run) -> None:
    """Re-estimate the running statistics of the BatchNorms ``bns`` as a cumulative average over
    ``batches``, calling ``run(batch)`` for each; every other module runs in eval mode. Affine
    parameters are unchanged; every module's train/eval mode and momentum come back afterwards."""
    bns, batches = list(bns), list(batches)
    if not bns or not batches:
        return
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # None: cumulative average
            bn.train()
        for batch in batches:
            run(batch)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, training in modes:
            m.train(training)
