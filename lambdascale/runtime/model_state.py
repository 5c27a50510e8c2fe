"""One model's stream on a node: its manifest and which chunks are held (verified).

ONE transport buffer per model (:func:`~lambdascale.runtime.tags.buffer_name`) holds the model's
whole byte stream (its block files concatenated in block order, format version 2). Chunks are
byte ranges of that stream and may span two blocks; a block is usable once every chunk
overlapping it is held (:meth:`ModelState.missing_for_blocks`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from lambdascale.model.manifest import Manifest
from lambdascale.store.pool import Allocation


@dataclass
class ModelState:
    """One model on this node: its manifest and which chunks are held (verified)."""

    manifest: Manifest
    held: set[int] = field(default_factory=set)
    events: dict[int, asyncio.Event] = field(default_factory=dict)
    arena_range: Allocation | None = None  # its stream buffer's range of the agent's arena, if there

    def event(self, chunk: int) -> asyncio.Event:
        """Set once ``chunk`` is held (a send list waits on it before forwarding the chunk)."""
        ev = self.events.get(chunk)
        if ev is None:
            ev = self.events[chunk] = asyncio.Event()
            if chunk in self.held:
                ev.set()
        return ev

    def mark_held(self, chunk: int) -> None:
        self.held.add(chunk)
        self.event(chunk).set()

    def missing_for_blocks(self, b0: int, b1: int) -> list[int]:
        """Chunks not yet held (verified) that blocks ``[b0, b1)`` need before a stage can use them
        (every chunk overlapping them, by the manifest's layout)."""
        return self.manifest.layout.missing_for_blocks(b0, b1, self.held)
