"""Argument checks, written once: every config, callback and command reports a bad value the same way.

Each check raises :class:`~hf_prune.errors.ConfigError` naming the argument, the value it got and
what it means, and returns the value normalised (``float`` / ``int``).
"""
from __future__ import annotations

import math

from ..errors import ConfigError

# What each fraction means, so that every message says it the same way.
MEANINGS = {
    "target_macs": "the fraction of the dense MACs to keep",
    "target_latency": "the fraction of the dense model's measured latency to keep",
    "sparsity": "the fraction of the prunable parameters to remove",
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fraction(name: str, value, *, closed_low: bool = False, closed_high: bool = True,
                   meaning: str | None = None) -> float:
    """``value`` as a float inside (0, 1] (by default); ``closed_low`` / ``closed_high`` choose the ends."""
    interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
    meaning = meaning or MEANINGS.get(name, "")
    ok = _is_number(value) and (value >= 0 if closed_low else value > 0) and (value <= 1 if closed_high else value < 1)
    if not ok:
        raise ConfigError(f"{name}={value!r} must be in {interval}" + (f": {meaning}" if meaning else ""))
    return float(value)


def check_target_macs(value) -> float:
    return check_fraction("target_macs", value)


def check_sparsity(value, name: str = "sparsity") -> float:
    return check_fraction(name, value, closed_low=True, closed_high=False, meaning=MEANINGS["sparsity"])


def check_int(name: str, value, *, minimum: int = 1, meaning: str = "") -> int:
    """``value`` as an int ``>= minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}" + (f" ({meaning})" if meaning else ""))
    return int(value)


def check_number(name: str, value, *, minimum: float | None = None, positive: bool = False,
                 meaning: str = "") -> float:
    """``value`` as a finite float, ``>= minimum`` (or ``> 0`` with ``positive``)."""
    bad = not _is_number(value) or (minimum is not None and value < minimum) or (positive and value <= 0)
    if bad:
        bound = " > 0" if positive else (f" >= {minimum}" if minimum is not None else "")
        raise ConfigError(f"{name}={value!r} must be a finite number{bound}" + (f" ({meaning})" if meaning else ""))
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in tuple(choices):
        raise ConfigError(f"{name}={value!r} is not one of {tuple(choices)}")
    return value


MEASURED = "measured"  # round_to="measured": widths chosen by timing them (with target_latency)


def check_round_to(value) -> int | str | None:
    """A channel multiple: a positive int, None for no rounding, or ``"measured"`` (widths chosen by timing)."""
    if value is None or value == MEASURED:
        return value
    return check_int("round_to", value, meaning="channels kept per group are a multiple of it; None disables rounding")


def check_position(name: str, value) -> float | int:
    """A point in training: a fraction in [0, 1] of the steps (float) or an optimizer step (int >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (isinstance(value, float) and value > 1):
        raise ConfigError(f"{name}={value!r} must be a fraction of training in [0, 1] (float) or an optimizer "
                          "step >= 0 (int)")
    return value


def check_names(name: str, value) -> tuple:
    """A list of module names (a bare string is refused: it would be read one character at a time)."""
    if isinstance(value, str):
        raise ConfigError(f"{name}={value!r} is a single string; pass a list of module names, e.g. {name}=[{value!r}]")
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be a list of module names") from None
    return items
