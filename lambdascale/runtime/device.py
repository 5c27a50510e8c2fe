"""A node's one accelerator, shared by every stage and instance the node hosts.

Steps run one at a time (:meth:`Device.step`). Waiting steps are served by priority, then in
arrival order:

* ``URGENT``: a stage of a pipeline that spans several nodes. Its peers wait on it, so it goes
  first.
* ``NORMAL``: a node serving the model alone (a full instance).

Under an emulated accelerator a step lasts at least its calibrated time: the real compute, then
an *emulated wait* (:meth:`DeviceStep.hold_until`) while the device would still be busy. A GPU
with prioritised streams runs an urgent kernel as soon as the kernels in flight free its units,
and the work it interrupted finishes that much later. The emulated wait of a ``NORMAL`` step
behaves the same way: when an urgent step queues, the normal step hands the device over, takes
it back (ahead of other normal steps) once the urgent step is done, and waits out the rest of
its time, so it ends later by what the urgent step took. Real compute is never interrupted.
Urgent steps are never interrupted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

URGENT = 0
_RESUME = 1  # a normal step taking the device back after an urgent one
NORMAL = 2


class Device:
    """One accelerator: a priority lock over steps, with interruptible emulated waits."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap of (priority, arrival, future)
        self._arrival = itertools.count()
        self._urgent_queued = asyncio.Event()
        self.preemptions = 0  # emulated waits that let an urgent step run

    @property
    def busy(self) -> bool:
        return self._held

    def _urgent_pending(self) -> bool:
        return any(p == URGENT and not f.done() for p, _, f in self._waiters)

    async def _acquire(self, priority: int) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrival), fut))
        if priority == URGENT:
            self._urgent_queued.set()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the device was handed to us as we were cancelled: pass it on
            raise
        finally:
            if not self._urgent_pending():
                self._urgent_queued.clear()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # ownership passes straight to the waiter
                return
        self._held = False

    @asynccontextmanager
    async def step(self, priority: int = NORMAL) -> AsyncIterator[DeviceStep]:
        """Hold the device for one step (``URGENT`` or ``NORMAL``)."""
        if priority not in (URGENT, NORMAL):
            raise ValueError(f"device step priority must be URGENT or NORMAL, got {priority}")
        await self._acquire(priority)
        st = DeviceStep(self, priority)
        try:
            yield st
        finally:
            if st.holding:  # not while it waits to take the device back (cancelled there)
                self._release()


class DeviceStep:
    """A step holding the device; :meth:`hold_until` is its emulated wait."""

    def __init__(self, device: Device, priority: int) -> None:
        self._device = device
        self._priority = priority
        self.holding = True
        self.lent_s = 0.0  # time this step lent the device to urgent steps

    async def hold_until(self, seconds: float) -> None:
        """Keep the device for ``seconds`` more of emulated work. A normal step lends it to every
        urgent step that queues meanwhile and then waits out what was left of its time."""
        dev = self._device
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._priority == URGENT:
                await asyncio.sleep(left)
                return
            if not dev._urgent_pending():
                if dev._urgent_queued.is_set():
                    dev._urgent_queued.clear()  # its urgent step already has the device or left
                waiter = asyncio.ensure_future(dev._urgent_queued.wait())
                try:
                    await asyncio.wait({waiter}, timeout=left)
                finally:
                    waiter.cancel()
                continue  # time is up, or an urgent step queued: the loop decides
            lent_from = time.monotonic()
            dev.preemptions += 1
            self.holding = False
            dev._release()  # the urgent step is first in the queue
            await dev._acquire(_RESUME)
            self.holding = True
            lent = time.monotonic() - lent_from
            self.lent_s += lent
            end += lent
