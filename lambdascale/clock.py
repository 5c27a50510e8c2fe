"""Injected clocks.

Policies never read wall-clock time: they receive ``now`` from their caller. Components that must
wait (the controller loop, the simulator) take a :class:`Clock` so production runs on the asyncio
loop's monotonic clock and the simulator on simulated time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """A source of monotonic time in seconds."""

    def now(self) -> float:
        """Current time in seconds; only differences are meaningful."""
        ...


class MonotonicClock:
    """Wall time for production: ``time.monotonic`` (the clock asyncio's loop uses on Linux)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock moved by hand: tests and the simulator advance it explicitly."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards (advance by {seconds})")
        self._now += seconds

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"cannot move a clock backwards ({self._now} -> {t})")
        self._now = float(t)
