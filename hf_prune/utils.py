"""Small shared helpers."""
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


def single_threaded_fn(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded():
            return fn(*args, **kwargs)
    return wrapper
