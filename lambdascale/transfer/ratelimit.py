"""Token bucket that caps a byte rate: emulates a cluster link (NIC) or an SSD on a laptop.

Written here because no shared rate limiter existed in ``lambdascale/store/`` when the data plane
was built. The bucket runs on *debt*: a grant larger than the tokens on hand is given at once and
the caller sleeps until the debt would have been paid at the configured rate, so a stream of
grants of any size averages exactly ``rate`` bytes/s with at most ``burst`` bytes of head start.
"""

from __future__ import annotations

import asyncio

from lambdascale.clock import Clock, MonotonicClock


def gbps_to_bytes_per_s(gbps: float) -> float:
    """Gbit/s (network convention, 10^9 bits) to bytes/s."""
    return gbps * 1e9 / 8.0


class TokenBucket:
    """Async byte-rate cap shared by every transfer of one direction of one agent.

    ``rate`` is in bytes/s; ``None`` means uncapped (``acquire`` returns at once).
    """

    def __init__(self, rate: float | None, burst: int, clock: Clock | None = None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s or None, got {rate}")
        if burst <= 0:
            raise ValueError(f"burst must be > 0 bytes, got {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock or MonotonicClock()
        self._tokens = float(burst)
        self._last = self._clock.now()

    def _refill(self) -> None:
        now = self._clock.now()
        assert self.rate is not None
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` of tokens now; return how long the caller must wait (seconds, >= 0)."""
        if self.rate is None or nbytes <= 0:
            return 0.0
        self._refill()
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may move under the cap."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)
