"""Chunk layout: which transfer chunks overlap which execution blocks.

A model's *byte stream* is the concatenation of its block files in block order. Blocks are the
unit of execution (layer ranges); chunks are the unit of transfer and verification. Both tile
the same stream ``[0, T)``, each as a sorted list of boundaries, so a chunk may span a block
boundary and a large block spans several chunks. Everything that maps chunks to blocks (multicast
source orders, block completion in the pipeline planner and the player, an agent's "which chunks
does this stage still need") asks a :class:`ChunkLayout`.

Two constructors:

* :meth:`ChunkLayout.uniform` reproduces the original rule exactly: chunk ``c`` belongs to block
  ``c * B // K`` (the stream is measured in chunks, a block is the run of its chunks), so no
  chunk spans two blocks. Planners default to it, and the simulator keeps using it.
* :meth:`ChunkLayout.equal_bytes` cuts the stream into ``K`` equal-byte chunks
  ``[c*T//K, (c+1)*T//K)`` over blocks of the given byte sizes (checkpoint format version 2):
  equal chunks are what the binomial pipeline's ``(k - 1 + log2 n) / k`` bound assumes.

Pure, immutable, no I/O.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

from lambdascale.errors import LambdaScaleError


class LayoutError(LambdaScaleError, ValueError):
    """Boundaries that do not tile a stream; the message names the field and the position."""


def _check_bounds(name: str, bounds: Sequence[int]) -> tuple[int, ...]:
    b = tuple(int(x) for x in bounds)
    if len(b) < 2:
        raise LayoutError(f"{name}: need at least 2 boundaries (one range), got {len(b)}")
    if b[0] != 0:
        raise LayoutError(f"{name}: must start at 0, starts at {b[0]}")
    for i in range(1, len(b)):
        if b[i] <= b[i - 1]:
            raise LayoutError(f"{name}: range {i - 1} is empty or reversed ([{b[i - 1]}, {b[i]}))")
    return b


@dataclass(frozen=True)
class ChunkLayout:
    """Block and chunk boundaries over one stream ``[0, total)``.

    ``block_bounds`` has ``B + 1`` entries (block ``b`` is ``[block_bounds[b], block_bounds[b+1])``),
    ``chunk_bounds`` has ``K + 1``; both start at 0 and end at the same total. Units are bytes for
    a real checkpoint and chunks for :meth:`uniform`.
    """

    block_bounds: tuple[int, ...]
    chunk_bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        bb = _check_bounds("block_bounds", self.block_bounds)
        cb = _check_bounds("chunk_bounds", self.chunk_bounds)
        if bb[-1] != cb[-1]:
            raise LayoutError(f"blocks end at {bb[-1]} but chunks end at {cb[-1]}: they must tile the same stream")
        object.__setattr__(self, "block_bounds", bb)
        object.__setattr__(self, "chunk_bounds", cb)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def uniform(cls, n_blocks: int, n_chunks: int) -> "ChunkLayout":
        """Today's rule: chunk ``c`` belongs to block ``c * B // K`` (needs ``K >= B``)."""
        if n_blocks < 1:
            raise LayoutError(f"n_blocks must be >= 1, got {n_blocks}")
        if n_chunks < n_blocks:
            raise LayoutError(f"n_chunks must be >= n_blocks={n_blocks} (every block needs a chunk), got {n_chunks}")
        # block b starts at the smallest c with c*B//K >= b, i.e. ceil(b*K/B)
        bb = [-(-b * n_chunks // n_blocks) for b in range(n_blocks + 1)]
        return cls(tuple(bb), tuple(range(n_chunks + 1)))

    @classmethod
    def equal_bytes(cls, block_nbytes: Sequence[int], n_chunks: int) -> "ChunkLayout":
        """``n_chunks`` equal-byte chunks ``[c*T//K, (c+1)*T//K)`` over blocks of these sizes."""
        if not block_nbytes:
            raise LayoutError("block_nbytes: need at least one block")
        bad = [i for i, n in enumerate(block_nbytes) if n <= 0]
        if bad:
            raise LayoutError(f"block_nbytes: block {bad[0]} has {block_nbytes[bad[0]]} bytes (must be > 0)")
        total = sum(block_nbytes)
        if not 1 <= n_chunks <= total:
            raise LayoutError(f"n_chunks must be in [1, total bytes={total}], got {n_chunks}")
        bb = [0]
        for n in block_nbytes:
            bb.append(bb[-1] + n)
        return cls(tuple(bb), equal_chunk_bounds(total, n_chunks))

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.block_bounds) - 1

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_bounds) - 1

    @property
    def total(self) -> int:
        return self.block_bounds[-1]

    def chunk_range(self, c: int) -> tuple[int, int]:
        """``[start, end)`` of chunk ``c`` in the stream."""
        self._check_chunk(c)
        return self.chunk_bounds[c], self.chunk_bounds[c + 1]

    def block_range(self, b: int) -> tuple[int, int]:
        """``[start, end)`` of block ``b`` in the stream."""
        self._check_block(b)
        return self.block_bounds[b], self.block_bounds[b + 1]

    def chunk_lengths(self) -> list[int]:
        cb = self.chunk_bounds
        return [cb[i + 1] - cb[i] for i in range(self.n_chunks)]

    # ---- overlaps --------------------------------------------------------------------------------
    def chunks_of_block(self, b: int) -> range:
        """Every chunk overlapping block ``b`` (contiguous; a boundary chunk may also overlap a neighbour)."""
        s, e = self.block_range(b)
        return range(bisect.bisect_right(self.chunk_bounds, s) - 1, bisect.bisect_left(self.chunk_bounds, e))

    def blocks_of_chunk(self, c: int) -> range:
        """Every block chunk ``c`` overlaps (one for :meth:`uniform`, possibly several otherwise)."""
        s, e = self.chunk_range(c)
        return range(bisect.bisect_right(self.block_bounds, s) - 1, bisect.bisect_left(self.block_bounds, e))

    @cached_property
    def _block_chunks(self) -> tuple[range, ...]:
        return tuple(self.chunks_of_block(b) for b in range(self.n_blocks))

    def blocks_held(self, chunks: Iterable[int]) -> set[int]:
        """Blocks whose every overlapping chunk is in ``chunks`` (a block is complete on a node)."""
        have = set(chunks)
        return {b for b, r in enumerate(self._block_chunks) if all(c in have for c in r)}

    def missing_for_blocks(self, b0: int, b1: int, held: Iterable[int]) -> list[int]:
        """Chunks blocks ``[b0, b1)`` need that are not in ``held``, ascending, each once."""
        have = set(held)
        if not 0 <= b0 < b1 <= self.n_blocks:
            raise LayoutError(f"block range [{b0}, {b1}) outside 0..{self.n_blocks}")
        first, last = self._block_chunks[b0][0], self._block_chunks[b1 - 1][-1]
        return [c for c in range(first, last + 1) if c not in have]

    def block_chunk_counts(self) -> list[int]:
        """How many chunks overlap each block (what a block waits for)."""
        return [len(r) for r in self._block_chunks]

    def is_uniform(self) -> bool:
        """True when this layout maps chunks to blocks exactly as ``uniform(B, K)`` does."""
        u = ChunkLayout.uniform(self.n_blocks, self.n_chunks) if self.n_chunks >= self.n_blocks else None
        return u is not None and all(self.blocks_of_chunk(c) == u.blocks_of_chunk(c) for c in range(self.n_chunks))

    def _check_chunk(self, c: int) -> None:
        if not 0 <= c < self.n_chunks:
            raise LayoutError(f"chunk {c} outside 0..{self.n_chunks - 1}")

    def _check_block(self, b: int) -> None:
        if not 0 <= b < self.n_blocks:
            raise LayoutError(f"block {b} outside 0..{self.n_blocks - 1}")


def equal_chunk_bounds(total: int, n_chunks: int) -> tuple[int, ...]:
    """Boundaries of ``n_chunks`` equal-byte chunks of a ``total``-byte stream: ``c * T // K``."""
    if not 1 <= n_chunks <= total:
        raise LayoutError(f"n_chunks must be in [1, total={total}], got {n_chunks}")
    return tuple(c * total // n_chunks for c in range(n_chunks + 1))


def resolve_layout(layout: ChunkLayout | None, n_blocks: int, n_chunks: int) -> ChunkLayout:
    """``layout`` checked against the planner's counts, or :meth:`ChunkLayout.uniform` when None."""
    if layout is None:
        return ChunkLayout.uniform(n_blocks, n_chunks)
    if (layout.n_blocks, layout.n_chunks) != (n_blocks, n_chunks):
        raise LayoutError(
            f"layout has {layout.n_blocks} blocks and {layout.n_chunks} chunks, the plan {n_blocks} and {n_chunks}"
        )
    return layout
