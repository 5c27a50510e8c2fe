"""``ScaleTimeline``: the record of one scale-out, shared by the gateway's log and the simulator's report.

Milestones of a scale-out, each a timestamp from the injected clock (never wall time):
decision -> first chunk received -> first pipeline serving -> each target node full -> pipelines
dissolved. Marks are first-write-wins (a later duplicate mark is ignored, so at-least-once event
delivery is harmless) and must not precede the decision (a ``ValueError`` names the milestone).

Example::

    tl = ScaleTimeline(event_id=1, model="llama2-7b", decided_at=clock.now(), targets=(3, 4, 5))
    tl.mark_first_chunk(clock.now())
    tl.mark_first_pipeline(clock.now())
    tl.mark_node_full(3, clock.now())
    log.info("scale event %s", tl.to_dict())    # durations relative to the decision included
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScaleTimeline:
    """Milestones of one scale-out of ``model`` onto ``targets`` (node ids). Times in clock seconds."""

    event_id: int
    model: str
    decided_at: float
    targets: tuple[int, ...] = ()
    first_chunk_at: float | None = None
    first_pipeline_at: float | None = None
    node_full_at: dict[int, float] = field(default_factory=dict)
    dissolved_at: float | None = None

    def _check(self, what: str, t: float) -> None:
        if t < self.decided_at:
            raise ValueError(
                f"scale event {self.event_id} ({self.model}): {what} at {t} precedes the decision at {self.decided_at}"
            )

    def mark_first_chunk(self, t: float) -> None:
        """A target received its first chunk."""
        self._check("first chunk", t)
        if self.first_chunk_at is None:
            self.first_chunk_at = t

    def mark_first_pipeline(self, t: float) -> None:
        """The first execution pipeline (or first full instance, for systems without λPipe) serves."""
        self._check("first pipeline", t)
        if self.first_pipeline_at is None:
            self.first_pipeline_at = t

    def mark_node_full(self, node: int, t: float) -> None:
        """``node`` holds the whole model and can serve alone."""
        self._check(f"node {node} full", t)
        if self.targets and node not in self.targets:
            raise ValueError(f"scale event {self.event_id} ({self.model}): node {node} is not a target of {self.targets}")
        self.node_full_at.setdefault(node, t)

    def mark_dissolved(self, t: float) -> None:
        """Every pipeline of this scale-out has been dissolved into full instances."""
        self._check("pipelines dissolved", t)
        if self.dissolved_at is None:
            self.dissolved_at = t

    @property
    def all_full_at(self) -> float | None:
        """When the last target became full (None until every target is full)."""
        if not self.targets or any(n not in self.node_full_at for n in self.targets):
            return None
        return max(self.node_full_at[n] for n in self.targets)

    @property
    def complete(self) -> bool:
        """True once every target is full."""
        return self.all_full_at is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record with absolute times and durations since the decision (None where unset)."""

        def rel(t: float | None) -> float | None:
            return None if t is None else t - self.decided_at

        return {
            "event_id": self.event_id,
            "model": self.model,
            "targets": list(self.targets),
            "decided_at": self.decided_at,
            "first_chunk_at": self.first_chunk_at,
            "first_pipeline_at": self.first_pipeline_at,
            "node_full_at": {str(k): v for k, v in sorted(self.node_full_at.items())},
            "all_full_at": self.all_full_at,
            "dissolved_at": self.dissolved_at,
            "first_chunk_s": rel(self.first_chunk_at),
            "first_pipeline_s": rel(self.first_pipeline_at),
            "all_full_s": rel(self.all_full_at),
            "dissolved_s": rel(self.dissolved_at),
        }


__all__ = ["ScaleTimeline"]
