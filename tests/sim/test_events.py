"""The event loop's one tie-break rule, cancellation, and independence of two loops."""

from __future__ import annotations

import pytest

from lambdascale.sim.events import EventLoop, Priority


def test_same_time_events_run_by_priority_then_schedule_order() -> None:
    loop = EventLoop()
    seen: list[str] = []
    # Scheduled in an order that differs from the documented one.
    loop.schedule(1.0, Priority.ARRIVAL, seen.append, "arrival-a")
    loop.schedule(1.0, Priority.CONTROL, seen.append, "control")
    loop.schedule(1.0, Priority.ARRIVAL, seen.append, "arrival-b")
    loop.schedule(1.0, Priority.TRANSFER, seen.append, "transfer")
    loop.schedule(0.5, Priority.REPORT, seen.append, "early")
    loop.run()
    assert seen == ["early", "transfer", "control", "arrival-a", "arrival-b"]
    assert loop.now() == 1.0


def test_cancel_and_run_until_closes_time() -> None:
    loop = EventLoop()
    seen: list[int] = []
    h = loop.schedule(2.0, Priority.STEP, seen.append, 2)
    loop.schedule(3.0, Priority.STEP, seen.append, 3)
    loop.schedule(9.0, Priority.STEP, seen.append, 9)
    loop.cancel(h)
    assert loop.run(until=5.0) == 5.0
    assert seen == [3]


def test_past_events_are_refused() -> None:
    loop = EventLoop()
    loop.schedule(1.0, Priority.STEP, lambda: None)
    loop.run()
    with pytest.raises(ValueError, match="past"):
        loop.schedule(0.5, Priority.STEP, lambda: None)


def test_two_loops_do_not_share_sequence_numbers() -> None:
    a, b = EventLoop(), EventLoop()
    for _ in range(3):
        a.schedule(0.0, Priority.STEP, lambda: None)
    hb = b.schedule(0.0, Priority.STEP, lambda: None)
    assert hb.seq == 0
