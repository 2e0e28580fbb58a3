"""Metric scripts that hf_prune ships for ``evaluate.load`` (which otherwise needs the Hub).

Each ``*.py`` file here is a self-contained ``evaluate`` metric script; load one offline with
``evaluate.load(hf_prune.metrics.ACCURACY_METRIC_PATH)`` or :func:`load_accuracy`.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
ACCURACY_METRIC_PATH = str(METRICS_DIR / "accuracy.py")

__all__ = ["METRICS_DIR", "ACCURACY_METRIC_PATH", "load_accuracy"]


def load_accuracy(**kwargs):
    """``evaluate.load`` of the shipped accuracy metric script (works offline)."""
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, **kwargs)
