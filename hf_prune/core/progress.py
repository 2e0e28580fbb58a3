"""Progress bars for long passes (calibration, curves, gradient collection, searches, coverage).

One helper so that every pass follows the same switches: transformers' verbosity
(``transformers.logging.set_verbosity_error()`` hides them), ``HF_PRUNE_DISABLE_PROGRESS=1`` or
``TQDM_DISABLE=1`` in the environment, and ``disable=True`` from a caller that knows better (a
``Trainer`` run with ``TrainingArguments(disable_tqdm=True)``). Bars are written to stderr and only
by the main process.
"""
from __future__ import annotations

import logging
import os

from .distributed import is_main_process


def progress_enabled() -> bool:
    """False when the environment, transformers' verbosity or a non-main process says so."""
    if os.environ.get("HF_PRUNE_DISABLE_PROGRESS", "").lower() in ("1", "true", "yes") \
            or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    if not is_main_process():
        return False
    return logging.getLogger("transformers").getEffectiveLevel() <= logging.WARNING


def progress(iterable=None, *, total: int | None = None, desc: str = "", disable: bool | None = None, **kwargs):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), hidden when progress is disabled."""
    from tqdm.auto import tqdm

    hidden = (not progress_enabled()) if disable is None else bool(disable)
    return tqdm(iterable, total=total, desc=f"hf_prune: {desc}" if desc else "hf_prune", disable=hidden,
                leave=False, dynamic_ncols=True, **kwargs)
