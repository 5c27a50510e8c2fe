"""A token bucket that caps a byte rate (the SSD tier's read rate, emulated links).

The core is a pure function, :func:`take`, of (bucket state, rate, burst, now, n): it returns the
new state and how long the caller must wait before using ``n`` tokens. Tokens may go negative
(debt) so a request larger than the burst is still served, just later; waits are then exactly
``n / rate`` on average. :class:`TokenBucket` wraps it with a lock and an injected clock for use
from threads (``acquire``) or asyncio (``acquire_async``).

Reuse: ``TokenBucket(rate_bytes_per_s, burst_bytes)``; ``bucket.acquire(nbytes)`` before moving
``nbytes``; ``TokenBucket.from_gbps(gbps)`` for a GB/s figure (1 GB = 1e9 bytes).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from lambdascale.clock import Clock, MonotonicClock


@dataclass(frozen=True)
class BucketState:
    """Tokens available (may be negative: debt) as of time ``t``."""

    tokens: float
    t: float


def take(state: BucketState, rate: float, burst: float, now: float, n: float) -> tuple[BucketState, float]:
    """Refill to ``now`` (capped at ``burst``), take ``n`` tokens, return (new state, wait seconds).

    ``now`` earlier than ``state.t`` is treated as ``state.t`` (time never runs backwards here).
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if n < 0:
        raise ValueError(f"cannot take a negative number of tokens ({n})")
    now = max(now, state.t)
    tokens = min(burst, state.tokens + (now - state.t) * rate) - n
    wait = 0.0 if tokens >= 0 else -tokens / rate
    return BucketState(tokens, now), wait


class TokenBucket:
    """Thread-safe token bucket: ``rate`` tokens (bytes) per second, at most ``burst`` banked."""

    def __init__(self, rate: float, burst: float | None = None, clock: Clock | None = None, start_full: bool = True) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else self.rate * 0.01  # 10 ms of traffic
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, got {self.burst}")
        self.clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._state = BucketState(self.burst if start_full else 0.0, self.clock.now())

    @classmethod
    def from_gbps(cls, gbps: float, clock: Clock | None = None) -> "TokenBucket":
        """A bucket for ``gbps`` GB/s (1e9 bytes/s) with 4 MB or 10 ms of traffic as burst, whichever is less."""
        rate = gbps * 1e9
        return cls(rate, burst=min(4e6, rate * 0.01), clock=clock)

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens now; return the seconds to wait before using them (0 if available)."""
        with self._lock:
            self._state, wait = take(self._state, self.rate, self.burst, self.clock.now(), n)
        return wait

    def acquire(self, n: int) -> float:
        """Blocking: wait until ``n`` tokens are ours. Returns the time waited (seconds)."""
        wait = self.reserve(n)
        if wait > 0:
            time.sleep(wait)
        return wait

    async def acquire_async(self, n: int) -> float:
        """Like :meth:`acquire` without blocking the event loop."""
        wait = self.reserve(n)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait
