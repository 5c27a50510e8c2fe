"""Observation helpers: sliding-window arrival rate and EWMA service time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lambdascale.control import ArrivalWindow, Ewma


def test_arrival_window_counts_only_the_window() -> None:
    w = ArrivalWindow(window_s=2.0)
    for t in (0.0, 0.5, 1.0, 1.5, 2.5):
        w.record(t)
    assert w.rate(2.5) == pytest.approx(3 / 2.0)  # 1.0, 1.5, 2.5 (0.5 is exactly 2 s old: out)
    assert w.rate(10.0) == 0.0


def test_arrival_window_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="window_s=0"):
        ArrivalWindow(0)
    w = ArrivalWindow(1.0)
    w.record(5.0)
    with pytest.raises(ValueError, match="precedes"):
        w.record(4.0)


@given(st.lists(st.floats(0, 100), max_size=50), st.floats(0.1, 20))
def test_arrival_window_matches_a_recount(ts, window) -> None:  # type: ignore[no-untyped-def]
    ts = sorted(ts)
    w = ArrivalWindow(window)
    for t in ts:
        w.record(t)
    now = ts[-1] if ts else 0.0
    assert w.rate(now) == pytest.approx(sum(1 for t in ts if now - window < t <= now) / window)


def test_ewma() -> None:
    e = Ewma(alpha=0.5)
    assert e.value == 0.0
    assert e.update(4.0) == 4.0
    assert e.update(2.0) == 3.0
    with pytest.raises(ValueError, match="alpha=0"):
        Ewma(0)
    with pytest.raises(ValueError, match="sample -1"):
        e.update(-1)
