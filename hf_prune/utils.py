"""Small shared helpers."""
from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def single_threaded():
    """Run many tiny tensor ops on one thread.

    The engine's bookkeeping is thousands of small indexing ops; with several intra-op threads each
    one pays a parallel-region barrier, which on a busy machine costs milliseconds per op.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
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
