"""The one token bucket of the project: caps a byte rate (emulated NVMe reads, emulated NIC links).

Used by the store (SSD tier reads, from loader threads) and by the data plane (each transport's
send and receive caps, an agent's SSD cap, from asyncio). One implementation so both emulate
bandwidth the same way.

The core is a pure function, :func:`take`, of (bucket state, rate, burst, now, n): it returns the
new state and how long the caller must wait before using ``n`` tokens. Tokens may go negative
(*debt*): a grant larger than the tokens on hand is given at once and the caller sleeps until the
debt would have been paid at ``rate``, so a stream of grants of any size averages exactly ``rate``
bytes/s with at most ``burst`` bytes of head start. :class:`TokenBucket` wraps it with a lock and
an injected clock for use from threads (``acquire``) or asyncio (``acquire_async``).

Reuse: ``TokenBucket(rate_bytes_per_s, burst_bytes)`` (``rate=None``: uncapped, every wait is 0);
``bucket.acquire(nbytes)`` / ``await bucket.acquire_async(nbytes)`` before moving ``nbytes``;
``TokenBucket.from_gbps(x)`` for x GB/s (bytes, 1e9/s, the storage convention);
``gbps_to_bytes_per_s(x)`` for x Gbit/s (bits, the network convention).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from lambdascale.clock import Clock, MonotonicClock


def gbps_to_bytes_per_s(gbps: float) -> float:
    """Gbit/s (network convention, 10^9 bits/s) to bytes/s."""
    return gbps * 1e9 / 8.0


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
    """Thread-safe token bucket: ``rate`` tokens (bytes) per second, at most ``burst`` banked.

    ``rate=None`` means uncapped: :meth:`reserve` always returns 0 (lets callers keep one code path
    whether or not a cap is configured).
    """

    def __init__(
        self, rate: float | None, burst: float | None = None, clock: Clock | None = None, start_full: bool = True
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive (bytes/s), or None for uncapped; got {rate}")
        self.rate = float(rate) if rate is not None else None
        if burst is None:
            burst = self.rate * 0.01 if self.rate is not None else 1.0  # 10 ms of traffic
        self.burst = float(burst)
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
        """Take ``n`` tokens now; return the seconds to wait before using them (0 if available or uncapped)."""
        if self.rate is None:
            return 0.0
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
