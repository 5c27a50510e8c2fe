"""Small observation helpers for snapshot builders (gateway and simulator): arrival rate and service time.

These are the only stateful pieces of the package and they are not policies: they turn a stream
of events into the numbers a :class:`~lambdascale.control.snapshot.ModelView` carries
(``arrival_rate``, ``service_time_s``). Times come from the caller (an injected clock), never
from the wall clock.

Example::

    arrivals = ArrivalWindow(window_s=10.0)
    service = Ewma(alpha=0.2)
    arrivals.record(clock.now())                 # on every request arrival
    service.update(finished_at - started_at)     # on every completion
    view = ModelView(..., arrival_rate=arrivals.rate(clock.now()), service_time_s=service.value)
"""

from __future__ import annotations

from collections import deque


class ArrivalWindow:
    """Requests per second over the last ``window_s`` seconds (a sliding window of arrival times)."""

    def __init__(self, window_s: float = 10.0) -> None:
        if not window_s > 0:
            raise ValueError(f"ArrivalWindow: window_s={window_s} must be > 0")
        self.window_s = float(window_s)
        self._times: deque[float] = deque()

    def record(self, t: float, n: int = 1) -> None:
        """Count ``n`` arrivals at time ``t`` (times must not go backwards)."""
        if self._times and t < self._times[-1]:
            raise ValueError(f"ArrivalWindow: arrival at {t} precedes the previous one at {self._times[-1]}")
        if n < 0:
            raise ValueError(f"ArrivalWindow: n={n} must be >= 0")
        self._times.extend([t] * n)

    def rate(self, now: float) -> float:
        """Arrivals in ``(now - window_s, now]`` divided by ``window_s``; drops older ones."""
        cutoff = now - self.window_s
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()
        return sum(1 for t in self._times if t <= now) / self.window_s


class Ewma:
    """Exponentially weighted mean (e.g. of request service times); ``value`` is 0.0 before any sample."""

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"Ewma: alpha={alpha} must be in (0, 1]")
        self.alpha = float(alpha)
        self.value = 0.0
        self._seen = False

    def update(self, x: float) -> float:
        """Fold in one sample (the first sample becomes the mean) and return the new mean."""
        if x < 0:
            raise ValueError(f"Ewma: sample {x} must be >= 0")
        self.value = x if not self._seen else self.alpha * x + (1 - self.alpha) * self.value
        self._seen = True
        return self.value


__all__ = ["ArrivalWindow", "Ewma"]
