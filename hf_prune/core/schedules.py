"""Sparsity and annealing schedules: how much is pruned at which training step.

A sparsity schedule is written over the **amount pruned** ``a`` (0 = dense) and converted to the
engine's convention when asked for a target:

* ``kind="target_macs"``: the engine target is the fraction of dense MACs to **keep**, ``1 − a``;
* ``kind="sparsity"``: the engine target is the fraction of prunable parameters to **remove**, ``a``.

Steps are optimizer steps counted from 0; "step ``t``" means *after ``t`` completed optimizer
steps*, so a pruning event at step 0 happens before any training. ``start`` and ``end`` are
fractions of the total number of training steps (``float`` in [0, 1], mapped to
``round(f · total)``) or absolute steps (``int``). Both are clamped to the last step that is
followed by training, ``total − 1``, so that a model is never pruned without any fine-tuning step
after it. Between ``start`` and ``end`` the schedule prunes every ``frequency`` steps and always at
``end``; before ``start`` the amount is ``initial`` (usually 0), from ``end`` on it is ``final``.

* :class:`OneShot`: everything at ``start``.
* :class:`Linear`: ``a_t = a_i + (a_f − a_i) · p``, with ``p = (t − start) / (end − start)``.
* :class:`Cubic` (Zhu & Gupta 2017, "To prune, or not to prune"):
  ``a_t = a_f + (a_i − a_f) · (1 − p)³`` — prunes fast early, when there is most redundancy, and
  slowly near the end.
* :class:`Geometric` (RD's iterative schedule): ``rounds`` pruning steps, each removing the same
  fraction of the surviving weights, so the amount after round ``t`` is ``1 − (1 − a_i)(1 − r)^t``
  (:func:`geometric_targets`).

:func:`restart_lr_lambda` is oViT's cyclic learning rate: back to the peak at every pruning step, decaying
until the next one.

:class:`Annealing` is a 0 → 1 coefficient over a window of steps (linear or cosine), used by
methods that morph a layer gradually (e.g. UPDP's activation → identity).

Everything here is pure arithmetic: no torch, no state besides the constructor's arguments, so a
schedule can be saved as its :meth:`SparsitySchedule.to_dict` and rebuilt with :func:`from_dict`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .checks import check_choice, check_fraction, check_int, check_sparsity

__all__ = [
    "KINDS",
    "SCHEDULES",
    "SparsitySchedule",
    "OneShot",
    "Linear",
    "Cubic",
    "Geometric",
    "geometric_amount",
    "geometric_targets",
    "Annealing",
    "restart_lr_lambda",
    "DECAYS",
    "make_schedule",
    "from_dict",
    "cubic_amount",
    "linear_amount",
    "resolve_step",
    "amount_from_target",
    "target_from_amount",
]

KINDS = ("target_macs", "sparsity", "target_latency")
KEPT_KINDS = ("target_macs", "target_latency")  # targets that say what fraction is kept


# ----------------------------------------------------------------------------------- pure helpers


def cubic_amount(progress: float, initial: float, final: float) -> float:
    """Zhu & Gupta: ``final + (initial − final) · (1 − progress)³``, progress clamped to [0, 1]."""
    p = min(1.0, max(0.0, float(progress)))
    return final + (initial - final) * (1.0 - p) ** 3


def linear_amount(progress: float, initial: float, final: float) -> float:
    """``initial + (final − initial) · progress``, progress clamped to [0, 1]."""
    p = min(1.0, max(0.0, float(progress)))
    return initial + (final - initial) * p


def amount_from_target(value: float, kind: str) -> float:
    """The amount pruned (0 = dense) that an engine target means."""
    _check_kind(kind)
    return 1.0 - float(value) if kind in KEPT_KINDS else float(value)


def target_from_amount(amount: float, kind: str) -> float:
    """The engine target (``target_macs`` kept, or ``sparsity`` removed) for an amount pruned."""
    _check_kind(kind)
    return 1.0 - float(amount) if kind in KEPT_KINDS else float(amount)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")


def _check_position(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a fraction of training (float in [0, 1]) or an absolute "
                         f"step (int >= 0)")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is a float, i.e. a fraction of the training steps, and must lie in "
                         f"[0, 1]; pass an int for an absolute step (e.g. {name}={int(value)})")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value} must be >= 0")


def resolve_step(position, total_steps: int) -> int:
    """A fraction (float) or absolute step (int) as a step index in ``[0, total_steps − 1]``."""
    _check_position("position", position)
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    step = int(round(position * total_steps)) if isinstance(position, float) else int(position)
    return max(0, min(step, total_steps - 1))


# ----------------------------------------------------------------------------------- sparsity schedules


@dataclass(frozen=True)
class SparsitySchedule:
    """Base class: ``final`` amount reached at ``end``, pruning every ``frequency`` steps from ``start``.

    Build one with a target in the engine's convention via :func:`make_schedule`, or directly with
    the amount pruned: ``Cubic(final=0.5, kind="target_macs")`` keeps 50% of the MACs at the end.
    """

    final: float
    kind: str = "target_macs"
    initial: float = 0.0
    start: float | int = 0.0
    end: float | int = 0.7
    frequency: int = 1

    name = "base"

    def __post_init__(self):
        _check_kind(self.kind)
        for field_name in ("final", "initial"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{field_name}={v!r}: the amount pruned must be a number in [0, 1)")
        if self.initial > self.final:
            raise ValueError(f"initial={self.initial} is more than final={self.final}: masks only grow, so the "
                             "amount pruned cannot decrease")
        _check_position("start", self.start)
        _check_position("end", self.end)
        if self.name != "oneshot" and type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(f"end={self.end} is before start={self.start}; pass end >= start")
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"frequency={self.frequency!r} must be an int >= 1 (prune every N optimizer steps)")

    # -- steps
    def steps(self, total_steps: int) -> tuple[int, int]:
        """``(start_step, end_step)`` for a run of ``total_steps`` optimizer steps."""
        s, e = resolve_step(self.start, total_steps), resolve_step(self.end, total_steps)
        if e < s:
            raise ValueError(f"end={self.end!r} resolves to step {e}, before start={self.start!r} (step {s}) for "
                             f"{total_steps} training steps; pass end >= start")
        return s, e

    def pruning_steps(self, total_steps: int) -> list[int]:
        """Every step at which :meth:`is_pruning_step` is true, in order."""
        s, e = self.steps(total_steps)
        return sorted(set(range(s, e + 1, self.frequency)) | {e})

    def is_pruning_step(self, step: int, total_steps: int) -> bool:
        s, e = self.steps(total_steps)
        return s <= step <= e and ((step - s) % self.frequency == 0 or step == e)

    # -- amounts and targets
    def progress(self, step: int, total_steps: int) -> float:
        s, e = self.steps(total_steps)
        if step < s:
            return 0.0
        if step >= e:
            return 1.0
        return (step - s) / (e - s)

    def _amount(self, progress: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def amount_at(self, step: int, total_steps: int) -> float:
        """Amount pruned (0 = dense) the schedule asks for at ``step``."""
        s, _ = self.steps(total_steps)
        if step < s:
            return self.initial
        return self._amount(self.progress(step, total_steps))

    def target_at(self, step: int, total_steps: int) -> float:
        """The engine target at ``step``: ``target_macs`` (fraction kept) or ``sparsity`` (fraction removed)."""
        return target_from_amount(self.amount_at(step, total_steps), self.kind)

    def target_kwargs(self, step: int, total_steps: int) -> dict:
        """``{"target_macs": x}`` or ``{"sparsity": x}``, ready for ``StructuredPruner.step(**...)``."""
        return {self.kind: self.target_at(step, total_steps)}

    @property
    def final_target(self) -> float:
        return target_from_amount(self.final, self.kind)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        d["start_type"], d["end_type"] = type(self.start).__name__, type(self.end).__name__
        return d


@dataclass(frozen=True)
class OneShot(SparsitySchedule):
    """All of ``final`` at ``start`` (``end`` is ignored)."""

    name = "oneshot"

    def steps(self, total_steps: int) -> tuple[int, int]:
        s = resolve_step(self.start, total_steps)
        return s, s

    def _amount(self, progress: float) -> float:
        return self.final


@dataclass(frozen=True)
class Linear(SparsitySchedule):
    name = "linear"

    def _amount(self, progress: float) -> float:
        return linear_amount(progress, self.initial, self.final)


@dataclass(frozen=True)
class Cubic(SparsitySchedule):
    name = "cubic"

    def _amount(self, progress: float) -> float:
        return cubic_amount(progress, self.initial, self.final)


# --------------------------------------------------------------------------- geometric (RD's rounds)


def _check_rounds(rounds, final, initial) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (pruning rounds)")
    for name, v in (("final", final), ("initial", initial)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}={v!r} must be a sparsity in [0, 1)")
    if initial > final:
        raise ValueError(f"initial={initial} is above final={final}: masks only grow")


def geometric_amount(rounds: int, final: float, initial: float = 0.0) -> float:
    """The per-round fraction ``a`` of surviving weights pruned: ``(1 − initial)(1 − a)^rounds = 1 − final``."""
    _check_rounds(rounds, final, initial)
    return 1.0 - ((1.0 - final) / (1.0 - initial)) ** (1.0 / rounds)


def geometric_targets(rounds: int, final: float, initial: float = 0.0) -> list[float]:
    """Sparsity after each of ``rounds`` rounds: ``1 − (1 − initial)(1 − a)^t`` for ``t = 1 … rounds``
    (the last one exactly ``final``)."""
    a = geometric_amount(rounds, final, initial)
    out = [1.0 - (1.0 - initial) * (1.0 - a) ** t for t in range(1, rounds + 1)]
    out[-1] = float(final)
    return out


@dataclass(frozen=True)
class Geometric(SparsitySchedule):
    """The iterative schedule of RD (Xu et al., ICCV 2023) for training: ``rounds`` pruning steps evenly spaced from ``start`` to
    ``end`` (the first at ``start``; ``frequency`` is not used), the amount after the ``t``-th being
    ``1 − (1 − initial)(1 − a)^t`` (:func:`geometric_targets`); before ``start`` the amount is ``initial``."""

    rounds: int = 5
    name = "geometric"

    def __post_init__(self):
        super().__post_init__()
        _check_rounds(self.rounds, self.final, self.initial)

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
        return geometric_targets(self.rounds, self.final, self.initial)[min(t, self.rounds) - 1]

    def _amount(self, progress: float) -> float:
        return self._target(1 + math.floor(progress * (self.rounds - 1) + 1e-9))

    def amount_at(self, step: int, total_steps: int) -> float:
        return self._target(sum(1 for p in self._round_steps(total_steps) if p <= step))


SCHEDULES = {"oneshot": OneShot, "linear": Linear, "cubic": Cubic, "geometric": Geometric}


def make_schedule(name: str = "cubic", *, target_macs: float | None = None, sparsity: float | None = None,
                  start: float | int = 0.0, end: float | int = 0.7, frequency: int = 1,
                  initial: float = 0.0, target_latency: float | None = None, rounds: int = 5) -> SparsitySchedule:
    """A schedule from an engine-convention target.

    Exactly one of ``target_macs`` (fraction of dense MACs to keep at the end, in (0, 1]),
    ``target_latency`` (fraction of the dense latency to keep, in (0, 1]) or ``sparsity`` (fraction of
    prunable parameters to remove at the end, in [0, 1)). ``initial`` is the amount pruned at ``start``
    (for ``linear``/``cubic``/``geometric``); ``rounds``: pruning steps of ``geometric`` only.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not one of {sorted(SCHEDULES)}")
    given = {k: v for k, v in (("target_macs", target_macs), ("sparsity", sparsity),
                               ("target_latency", target_latency)) if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of target_macs= (fraction of dense MACs to keep, e.g. 0.5), "
                         "sparsity= (fraction of prunable parameters to remove, e.g. 0.3) or target_latency= "
                         f"(fraction of the dense latency to keep); got {given or 'none'}")
    (kind, value), = given.items()
    value = check_sparsity(value) if kind == "sparsity" else check_fraction(kind, value)
    extra = {"rounds": rounds} if name == "geometric" else {}
    return SCHEDULES[name](final=amount_from_target(value, kind), kind=kind, initial=initial, start=start,
                           end=end, frequency=frequency, **extra)


def from_dict(d: dict) -> SparsitySchedule:
    """Inverse of :meth:`SparsitySchedule.to_dict`."""
    d = dict(d)
    cls = SCHEDULES[d.pop("name")]
    for key in ("start", "end"):
        typ = d.pop(f"{key}_type", None)
        if typ == "int":
            d[key] = int(d[key])
        elif typ == "float":
            d[key] = float(d[key])
    return cls(**d)


# ----------------------------------------------------------------------------------- learning-rate restarts

DECAYS = ("linear", "cosine", "constant")


def restart_lr_lambda(prune_steps: Sequence[int], total_steps: int, *, decay: str = "linear",
                      min_ratio: float = 0.0, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier of oViT's cyclic schedule (restarts at every pruning step), for
    ``torch.optim.lr_scheduler.LambdaLR``.

    Steps are optimizer steps. A cycle starts at every step of ``prune_steps`` (the pruning steps of the
    sparsity schedule, e.g. ``schedule.pruning_steps(total_steps)``) and the last one runs to
    ``total_steps`` (the final fine-tuning); training before the first pruning step is one more cycle
    from step 0. Within a cycle of length ``L`` the multiplier rises linearly over
    ``warmup_steps`` (capped at ``L``) from ``min_ratio`` to 1, then decays to ``min_ratio`` at the
    cycle's end: ``"linear"``, ``"cosine"`` or ``"constant"`` (stays at 1).
    """
    check_choice("decay", decay, DECAYS)
    min_ratio = check_fraction("min_ratio", min_ratio, closed_low=True, meaning="the multiplier at a cycle's end")
    total_steps = check_int("total_steps", total_steps)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    steps = {int(s) for s in prune_steps if 0 <= int(s) < total_steps}
    if not steps:
        raise ValueError(f"prune_steps={list(prune_steps)!r} has no step in [0, {total_steps}); give the pruning "
                           "steps of the sparsity schedule")
    starts = sorted(steps | {0})  # training before the first pruning step is a cycle of its own
    ends = starts[1:] + [total_steps]

    def multiplier(step: int) -> float:
        i = max(0, sum(1 for s in starts if s <= step) - 1)
        length = max(1, ends[i] - starts[i])
        t = min(max(step - starts[i], 0), length)
        warm = min(warmup_steps, length - 1)
        if t < warm:
            return min_ratio + (1.0 - min_ratio) * (t + 1) / (warm + 1)
        if decay == "constant":
            return 1.0
        p = (t - warm) / max(1, length - warm)
        shape = 1.0 - p if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return min_ratio + (1.0 - min_ratio) * shape

    return multiplier


# ----------------------------------------------------------------------------------- annealing


@dataclass(frozen=True)
class Annealing:
    """A coefficient that goes from 0 to 1 between ``start`` and ``end`` (fractions or steps).

    ``shape="linear"`` or ``"cosine"`` (``(1 − cos(π p)) / 2``, flat at both ends). Before
    ``start`` it is 0, from ``end`` on 1. UPDP-style depth pruning uses it as λ in
    ``act_λ(x) = (1 − λ)·act(x) + λ·x``.
    """

    start: float | int = 0.0
    end: float | int = 1.0
    shape: str = "linear"

    SHAPES = ("linear", "cosine")

    def __post_init__(self):
        _check_position("start", self.start)
        _check_position("end", self.end)
        if type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(f"end={self.end} is before start={self.start}; pass end >= start")
        if self.shape not in self.SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {self.SHAPES}")

    def _bounds(self, total_steps: int) -> tuple[float, float]:
        def at(v):
            return v * total_steps if isinstance(v, float) else float(v)

        return at(self.start), at(self.end)

    def value(self, step: int, total_steps: int) -> float:
        """The coefficient in [0, 1] at ``step`` of a ``total_steps`` run; 1 exactly from ``end`` on."""
        s, e = self._bounds(total_steps)
        if step >= e:
            return 1.0
        if step <= s:
            return 0.0
        p = (step - s) / (e - s)
        return p if self.shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))

    __call__ = value
