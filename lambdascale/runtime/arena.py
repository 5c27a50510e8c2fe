"""A node's resident memory for model landing zones (the emulated accelerator's memory).

On a GPU node the memory an instance lands in is already there: device memory (or a pinned host
pool made at start) is resident, so receiving a model costs the copy and nothing else. An agent on
this machine stands in for that memory with host RAM, and fresh host buffers are not resident:
``Transport.allocate`` must touch every page first, which for a 1.26 GB model on four receivers
sharing two cores took about 6 s of every scale-out before the first byte moved.

With ``runtime.device_arena_gb`` > 0 an agent makes one arena of that size resident when it
starts (in a worker thread, before it answers ``Warmup``) and carves each model's stream buffer
from it with the store's first-fit :class:`~lambdascale.store.pool.RangeAllocator` (4 KiB
aligned, coalescing on free). A model that does not fit falls back to a fresh buffer. Carved
buffers are not zeroed: every chunk is written by a verified transfer or read before it counts
as held (``ModelState.held``), so old bytes are never used.
"""

from __future__ import annotations

import numpy as np

from lambdascale.store.pool import Allocation, PoolFullError, RangeAllocator

ALIGN = 4096


class Arena:
    """``nbytes`` of resident memory with a :class:`RangeAllocator` over it."""

    def __init__(self, nbytes: int, align: int = ALIGN) -> None:
        if nbytes <= 0:
            raise ValueError(f"arena size must be > 0 bytes, got {nbytes}")
        self.memory = np.empty(nbytes, dtype=np.uint8)
        self.memory.fill(0)  # touch every page now (the point of the arena); releases the GIL
        self.ranges = RangeAllocator(nbytes, align)

    @property
    def size(self) -> int:
        return self.ranges.capacity

    @property
    def free_bytes(self) -> int:
        return self.ranges.free_bytes

    def take(self, nbytes: int) -> tuple[Allocation, np.ndarray] | None:
        """(its range, a ``uint8`` view of ``nbytes``) carved from the arena, or None when full."""
        try:
            a = self.ranges.alloc(nbytes)
        except PoolFullError:
            return None
        return a, self.memory[a.offset : a.offset + nbytes]

    def give(self, a: Allocation) -> None:
        self.ranges.free(a)
