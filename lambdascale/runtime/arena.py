"""A node's resident memory for model landing zones (the emulated accelerator's memory).

On a GPU node the memory an instance lands in is already there: device memory (or a pinned host
pool made at start) is resident, so receiving a model costs the copy and nothing else. An agent on
this machine stands in for that memory with host RAM, and fresh host buffers are not resident:
``Transport.allocate`` must touch every page first, which for a 1.26 GB model on four receivers
sharing two cores took about 6 s of every scale-out before the first byte moved.

With ``runtime.device_arena_gb`` > 0 an agent makes one arena of that size resident when it
starts (in a worker thread, before it answers ``Warmup``) and carves each model's stream buffer
from it: first fit at ``ALIGN``-byte boundaries, coalescing on free. A model that does not fit
falls back to a fresh buffer. Carved buffers are not zeroed: every chunk is written by a verified
transfer or read before it counts as held (``ModelState.held``), so old bytes are never used.

:class:`FreeList` is the pure allocator (offsets only); :class:`Arena` binds it to the memory.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

ALIGN = 4096


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class FreeList:
    """First-fit allocation of aligned ranges of ``[0, size)``; freeing coalesces neighbours."""

    size: int
    align: int = ALIGN
    _free: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), sorted, disjoint, not adjacent
    _used: dict[int, int] = field(default_factory=dict)  # offset -> length

    def __post_init__(self) -> None:
        if self.size < 0 or self.align <= 0:
            raise ValueError(f"free list needs size >= 0 and align > 0, got {self.size}, {self.align}")
        usable = self.size - self.size % self.align
        self._free = [(0, usable)] if usable else []

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def used(self) -> dict[int, int]:
        return dict(self._used)

    def take(self, nbytes: int) -> int | None:
        """Offset of a new range of ``nbytes`` (rounded up to ``align``), or None when none fits."""
        if nbytes <= 0:
            raise ValueError(f"allocation must be > 0 bytes, got {nbytes}")
        want = _round_up(nbytes, self.align)
        for i, (off, n) in enumerate(self._free):
            if n >= want:
                if n == want:
                    del self._free[i]
                else:
                    self._free[i] = (off + want, n - want)
                self._used[off] = want
                return off
        return None

    def give(self, offset: int) -> None:
        """Return the range that :meth:`take` gave at ``offset``."""
        n = self._used.pop(offset, None)
        if n is None:
            raise ValueError(f"offset {offset} is not an allocated range")
        i = bisect.bisect_left(self._free, (offset, 0))
        start, end = offset, offset + n
        if i < len(self._free) and self._free[i][0] == end:  # merge with the next free range
            end += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and with the previous one
            start = self._free[i - 1][0]
            i -= 1
            self._free.pop(i)
        self._free.insert(i, (start, end - start))


class Arena:
    """``nbytes`` of resident memory with a :class:`FreeList` over it."""

    def __init__(self, nbytes: int, align: int = ALIGN) -> None:
        if nbytes <= 0:
            raise ValueError(f"arena size must be > 0 bytes, got {nbytes}")
        self.memory = np.empty(nbytes, dtype=np.uint8)
        self.memory.fill(0)  # touch every page now (the point of the arena); releases the GIL
        self.free_list = FreeList(nbytes, align)

    def take(self, nbytes: int) -> tuple[int, np.ndarray] | None:
        """(offset, a ``uint8`` view of ``nbytes``) carved from the arena, or None when full."""
        off = self.free_list.take(nbytes)
        if off is None:
            return None
        return off, self.memory[off : off + nbytes]

    def give(self, offset: int) -> None:
        self.free_list.give(offset)
