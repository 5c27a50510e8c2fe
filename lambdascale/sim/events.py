"""The discrete-event loop: pop the earliest event, call its handler, push its follow-ups.

The loop knows nothing about clusters or policies. Ordering is total and deterministic:

**Tie-break rule (the only one):** events are ordered by ``(time, priority, seq)``. Events at the
same simulated time run in increasing :class:`Priority` (completions before decisions before
arrivals, so a decision sees every transfer and step that finished at that instant, and a request
arriving at that instant sees the decision's result; the gateway dispatches after every arrival of
the instant, so requests arriving together start together); equal priorities run in the order they were
scheduled (``seq`` is a per-loop counter, never a global one, so two loops in one process never
interfere).

Cancelled events are dropped lazily: :meth:`EventLoop.cancel` marks the handle and the loop skips
it when it reaches the top of the heap.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable


class Priority(IntEnum):
    """Order of same-time events (lower runs first); see the module docstring."""

    TRANSFER = 0   # a flow or chunk lands
    STEP = 1       # an instance finishes a batch step
    STATE = 2      # an instance / pipeline changes state (ready, dissolved, released)
    CONTROL = 3    # the controller observes and decides
    ARRIVAL = 4    # a request arrives
    DISPATCH = 5   # the gateway dispatches what arrived at this instant (arriving together, batched together)
    REPORT = 6     # sampling for plots and progress


@dataclass(order=False, eq=False)
class EventHandle:
    """A scheduled event; keep it to cancel the event later."""

    time: float
    priority: Priority
    seq: int
    fn: Callable[..., None]
    args: tuple[Any, ...] = field(default_factory=tuple)
    cancelled: bool = False


class EventLoop:
    """A heap of events ordered by ``(time, priority, seq)`` and a simulated clock.

    Implements the :class:`lambdascale.clock.Clock` protocol (``now()``) so components written
    against an injected clock run on simulated time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[tuple[float, int, int, EventHandle]] = []
        self._seq = 0
        self.processed = 0

    def now(self) -> float:
        """Current simulated time in seconds."""
        return self._now

    def schedule(self, time: float, priority: Priority, fn: Callable[..., None], *args: Any) -> EventHandle:
        """Run ``fn(*args)`` at simulated ``time`` (never earlier than now)."""
        if math.isnan(time):
            raise ValueError("cannot schedule an event at time NaN")
        if time < self._now:
            raise ValueError(f"cannot schedule an event in the past ({time} < now {self._now})")
        h = EventHandle(float(time), priority, self._seq, fn, args)
        self._seq += 1
        heapq.heappush(self._heap, (h.time, int(priority), h.seq, h))
        return h

    def after(self, delay: float, priority: Priority, fn: Callable[..., None], *args: Any) -> EventHandle:
        """Run ``fn(*args)`` ``delay`` seconds from now."""
        return self.schedule(self._now + max(0.0, delay), priority, fn, *args)

    @staticmethod
    def cancel(handle: EventHandle | None) -> None:
        """Drop a scheduled event (no-op on None or on an event that already ran)."""
        if handle is not None:
            handle.cancelled = True

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf, max_events: int | None = None) -> float:
        """Process events with ``time <= until``; returns the time reached.

        Time ends at ``until`` when given (finite) so "GPU time held" integrals close there.
        """
        heap = self._heap
        n = 0
        while heap:
            t, _, _, h = heap[0]
            if t > until:
                break
            heapq.heappop(heap)
            if h.cancelled:
                continue
            self._now = t
            h.fn(*h.args)
            n += 1
            if max_events is not None and n >= max_events:
                break
        self.processed += n
        if math.isfinite(until) and (not heap or heap[0][0] > until) and until > self._now:
            self._now = until
        return self._now
