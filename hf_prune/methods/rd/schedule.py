"""RD's iterative schedule (Xu et al., ICCV 2023): prune in ``k`` rounds, each round removing the same
fraction ``a`` of the weights that survived the previous one, so the sparsity after round ``t`` is
``1 − (1 − a)^t`` (from a dense model) and round ``k`` reaches the final sparsity. The paper re-measures
the distortion curves and re-solves the allocation every round, fine-tuning in between.

* :func:`rd_schedule` — the ``k`` targets, for one-shot use (``allocate_rd(..., rounds=k)``).
* :class:`Geometric` — the same targets as a training schedule (a
  :class:`~hf_prune.core.schedules.SparsitySchedule` of kind ``"sparsity"``): ``rounds`` pruning
  steps evenly spaced from ``start`` to ``end``, fine-tuning between them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.schedules import SparsitySchedule

__all__ = ["rd_amount", "rd_schedule", "Geometric"]


def _check(rounds, final, initial) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (pruning rounds)")
    for name, v in (("final", final), ("initial", initial)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}={v!r} must be a sparsity in [0, 1)")
    if initial > final:
        raise ValueError(f"initial={initial} is above final={final}: masks only grow")


def rd_amount(rounds: int, final: float, initial: float = 0.0) -> float:
    """The per-round fraction ``a`` of surviving weights pruned: ``(1 − initial)(1 − a)^rounds = 1 − final``."""
    _check(rounds, final, initial)
    return 1.0 - ((1.0 - final) / (1.0 - initial)) ** (1.0 / rounds)


def rd_schedule(rounds: int, final: float, initial: float = 0.0) -> list[float]:
    """Sparsity after each of ``rounds`` rounds: ``1 − (1 − initial)(1 − a)^t`` for ``t = 1 … rounds``
    (the last one exactly ``final``)."""
    a = rd_amount(rounds, final, initial)
    out = [1.0 - (1.0 - initial) * (1.0 - a) ** t for t in range(1, rounds + 1)]
    out[-1] = float(final)
    return out


@dataclass(frozen=True)
class Geometric(SparsitySchedule):
    """RD's iterative schedule for training: ``rounds`` pruning steps evenly spaced from ``start`` to
    ``end`` (the first at ``start``; ``frequency`` is not used), the amount after the ``t``-th being
    ``1 − (1 − initial)(1 − a)^t`` (:func:`rd_schedule`); before ``start`` the amount is ``initial``."""

    rounds: int = 5
    name = "geometric"

    def __post_init__(self):
        super().__post_init__()
        _check(self.rounds, self.final, self.initial)

    def _round_steps(self, total_steps: int) -> list[int]:
        s, e = self.steps(total_steps)
        if self.rounds == 1:
            return [s]
        return [s + int(round(t * (e - s) / (self.rounds - 1))) for t in range(self.rounds)]

    def pruning_steps(self, total_steps: int) -> list[int]:
        return sorted(set(self._round_steps(total_steps)))

    def is_pruning_step(self, step: int, total_steps: int) -> bool:
        return step in self._round_steps(total_steps)

    def _target(self, t: int) -> float:
        if t <= 0:
            return self.initial
        return rd_schedule(self.rounds, self.final, self.initial)[min(t, self.rounds) - 1]

    def _amount(self, progress: float) -> float:
        return self._target(1 + math.floor(progress * (self.rounds - 1) + 1e-9))

    def amount_at(self, step: int, total_steps: int) -> float:
        return self._target(sum(1 for p in self._round_steps(total_steps) if p <= step))
