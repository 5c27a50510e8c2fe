"""The host-memory pool: one buffer (pinned when CUDA is present), blocks allocated inside it.

Why one pool: pinning memory is slow and pinned memory is scarce, so a node pins one region once
and places block bytes inside it. The allocator is first-fit over a free list kept sorted by
offset with neighbours coalesced on free; every allocation is rounded up to ``align`` bytes (so
tensors parsed in place stay aligned). Capacity is never over-committed: ``alloc`` either finds
room or raises :class:`PoolFullError`; the sum of live allocations never exceeds the capacity.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from lambdascale.errors import LambdaScaleError


class PoolFullError(LambdaScaleError):
    """No free range of the requested size (the message gives sizes and the capacity)."""


@dataclass(frozen=True)
class Allocation:
    """A byte range [offset, offset + size) of a pool; ``nbytes`` is what was asked for."""

    offset: int
    size: int
    nbytes: int
    serial: int = field(compare=True)


class RangeAllocator:
    """First-fit allocator of byte ranges over ``capacity`` (pure bookkeeping, no memory)."""

    def __init__(self, capacity: int, align: int = 4096) -> None:
        if capacity <= 0:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, got {align}")
        self.capacity = capacity
        self.align = align
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (offset, size), sorted, coalesced
        self._live: dict[int, Allocation] = {}
        self._serial = 0

    @property
    def used(self) -> int:
        return sum(a.size for a in self._live.values())

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self._free)

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)

    def rounded(self, nbytes: int) -> int:
        return max(self.align, -(-nbytes // self.align) * self.align)

    def alloc(self, nbytes: int) -> Allocation:
        if nbytes <= 0:
            raise ValueError(f"allocation size must be positive, got {nbytes}")
        size = self.rounded(nbytes)
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self._serial += 1
                a = Allocation(off, size, nbytes, self._serial)
                self._live[off] = a
                return a
        raise PoolFullError(
            f"host pool cannot fit {nbytes} bytes: {self.free_bytes} free of {self.capacity} "
            f"(largest free range {self.largest_free})"
        )

    def free(self, a: Allocation) -> None:
        live = self._live.get(a.offset)
        if live is None or live.serial != a.serial:
            raise ValueError(f"allocation at offset {a.offset} is not live (double free?)")
        del self._live[a.offset]
        i = bisect.bisect_left(self._free, (a.offset, 0))
        off, size = a.offset, a.size
        if i < len(self._free) and self._free[i][0] == off + size:  # merge with next
            size += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # merge with previous
            poff, psize = self._free[i - 1]
            self._free[i - 1] = (poff, psize + size)
        else:
            self._free.insert(i, (off, size))

    def check(self) -> None:
        """Invariants (tests call this): ranges disjoint, inside capacity, free + used = capacity."""
        spans = sorted([(a.offset, a.size) for a in self._live.values()] + self._free)
        pos = 0
        for off, size in spans:
            if off != pos or size <= 0:
                raise AssertionError(f"pool ranges overlap or leave a hole at {pos}: {spans}")
            pos += size
        if pos != self.capacity:
            raise AssertionError(f"pool ranges cover {pos} of {self.capacity}")
        for (a, sa), (b, _) in zip(self._free, self._free[1:]):
            if a + sa == b:
                raise AssertionError("free ranges not coalesced")


class HostPool:
    """A pool of host memory: one uint8 tensor, pinned when requested and CUDA is available."""

    def __init__(self, capacity: int, pinned: bool | None = None, align: int = 4096) -> None:
        self.allocator = RangeAllocator(capacity, align)
        want_pin = torch.cuda.is_available() if pinned is None else pinned
        if want_pin and not torch.cuda.is_available():
            raise LambdaScaleError("a pinned host pool needs CUDA; this machine has none (set store.pinned to auto or off)")
        self.pinned = bool(want_pin)
        # Untouched pages of a plain allocation cost nothing until used, so a large capacity is cheap on CPU.
        # The base is aligned to 4 KiB (direct I/O lands whole pages straight into the pool).
        page = max(4096, align)
        self._raw = torch.empty(capacity + page, dtype=torch.uint8, pin_memory=self.pinned)
        shift = (-self._raw.data_ptr()) % page
        self.buffer = self._raw[shift : shift + capacity]

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def alloc(self, nbytes: int) -> Allocation:
        return self.allocator.alloc(nbytes)

    def free(self, a: Allocation) -> None:
        self.allocator.free(a)

    def tensor(self, a: Allocation) -> torch.Tensor:
        """The ``nbytes`` of an allocation as a 1-D uint8 tensor view (no copy)."""
        return self.buffer[a.offset : a.offset + a.nbytes]

    def view(self, a: Allocation) -> memoryview:
        """The ``nbytes`` of an allocation as a writable memoryview (for ``readinto``/hashing)."""
        return self.tensor(a).numpy().data

    def view_padded(self, a: Allocation) -> memoryview:
        """The whole allocated range (``size >= nbytes``, a multiple of the alignment): the slack
        lets direct I/O read whole pages."""
        return self.buffer[a.offset : a.offset + a.size].numpy().data
