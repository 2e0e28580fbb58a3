"""Sparsity schedules (one-shot, linear, cubic) and the annealing helper: pure arithmetic."""
from __future__ import annotations

import pytest

from hf_prune.core.schedules import (Annealing, Cubic, Linear, OneShot, cubic_amount, from_dict, linear_amount,
                                     make_schedule, resolve_step)


def test_cubic_formula_exact_values():
    # s_t = s_f + (s_i - s_f)(1 - t/T)^3
    assert cubic_amount(0.0, 0.0, 0.8) == 0.0
    assert cubic_amount(0.5, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)  # 0.7
    assert cubic_amount(0.25, 0.1, 0.5) == pytest.approx(0.5 + (0.1 - 0.5) * 0.75 ** 3)  # 0.33125
    assert cubic_amount(1.0, 0.1, 0.5) == 0.5
    assert cubic_amount(2.0, 0.1, 0.5) == 0.5  # clamped
    assert linear_amount(0.25, 0.0, 0.8) == pytest.approx(0.2)

    # over steps: start 10, end 50 of 100 steps, amount pruned 0 -> 0.6 (target_macs 0.4)
    s = make_schedule("cubic", target_macs=0.4, start=10, end=50, frequency=10)
    assert isinstance(s, Cubic) and s.final == pytest.approx(0.6)
    assert s.steps(100) == (10, 50)
    assert s.amount_at(0, 100) == 0.0 and s.amount_at(10, 100) == 0.0
    assert s.amount_at(20, 100) == pytest.approx(0.6 - 0.6 * 0.75 ** 3)  # 0.346875
    assert s.amount_at(30, 100) == pytest.approx(0.6 - 0.6 * 0.5 ** 3)  # 0.525
    assert s.amount_at(50, 100) == pytest.approx(0.6) and s.amount_at(99, 100) == pytest.approx(0.6)
    # engine convention: target_macs = fraction kept
    assert s.target_at(30, 100) == pytest.approx(1 - 0.525)
    assert s.target_kwargs(50, 100) == {"target_macs": pytest.approx(0.4)}
    assert s.pruning_steps(100) == [10, 20, 30, 40, 50]
    assert [t for t in range(100) if s.is_pruning_step(t, 100)] == [10, 20, 30, 40, 50]


def test_fractions_sparsity_and_frequency():
    s = make_schedule("linear", sparsity=0.5, start=0.1, end=0.5, frequency=7)
    assert isinstance(s, Linear) and s.kind == "sparsity"
    assert s.steps(200) == (20, 100)
    assert s.pruning_steps(200) == [20, 27, 34, 41, 48, 55, 62, 69, 76, 83, 90, 97, 100]  # end always included
    assert s.target_at(60, 200) == pytest.approx(0.25)  # sparsity = amount removed
    assert s.target_at(150, 200) == pytest.approx(0.5)
    # fractions clamp to the last step followed by training
    assert resolve_step(1.0, 10) == 9 and resolve_step(0.5, 10) == 5 and resolve_step(50, 10) == 9


def test_oneshot():
    s = make_schedule("oneshot", target_macs=0.5, start=0.25)
    assert isinstance(s, OneShot)
    assert s.pruning_steps(40) == [10]
    assert s.amount_at(9, 40) == 0.0 and s.amount_at(10, 40) == 0.5 and s.target_at(30, 40) == 0.5
    assert make_schedule("oneshot", sparsity=0.3, start=0.9, end=0.1).pruning_steps(10) == [9]  # end ignored


def test_roundtrip_dict():
    for s in (make_schedule("cubic", target_macs=0.6, start=5, end=0.5, frequency=3),
              make_schedule("oneshot", sparsity=0.2)):
        assert from_dict(s.to_dict()) == s


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_macs=0.5, sparsity=0.3), "exactly one"),
    (dict(), "exactly one"),
    (dict(target_macs=0.0), r"target_macs=0\.0 must be in \(0, 1\]"),
    (dict(target_macs=1.5), "target_macs=1.5"),
    (dict(sparsity=1.0), r"sparsity=1\.0 must be in \[0, 1\)"),
    (dict(target_macs=0.5, start=0.6, end=0.2), "end=0.2 is before start=0.6"),
    (dict(target_macs=0.5, start=1.5), "start=1.5 is a float"),
    (dict(target_macs=0.5, frequency=0), "frequency=0"),
])
def test_errors_name_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule("cubic", **kwargs)
    with pytest.raises(ValueError, match="schedule='exp'"):
        make_schedule("exp", target_macs=0.5)


def test_mixed_start_end_checked_against_total():
    s = make_schedule("cubic", target_macs=0.5, start=50, end=0.2)
    with pytest.raises(ValueError, match="before start"):
        s.steps(100)


def test_annealing():
    a = Annealing(start=0.2, end=0.6)
    assert a.value(0, 100) == 0.0 and a.value(20, 100) == 0.0
    assert a.value(40, 100) == pytest.approx(0.5)
    assert a.value(60, 100) == 1.0 and a(99, 100) == 1.0
    c = Annealing(start=10, end=30, shape="cosine")
    assert c.value(20, 100) == pytest.approx(0.5)
    assert c.value(15, 100) == pytest.approx(0.5 * (1 - 2 ** -0.5))
    with pytest.raises(ValueError, match="shape="):
        Annealing(shape="exp")
    with pytest.raises(ValueError, match="end=0.1 is before start=0.5"):
        Annealing(start=0.5, end=0.1)
