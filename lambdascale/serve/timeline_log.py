"""Logging every scale event as a timeline: decision, first chunk, first pipeline, each node full, dissolved.

The serving side records each scale-out in the control engineer's :class:`ScaleTimeline` (times
from the injected clock). :class:`TimelineLogger` turns the milestones it has not reported yet
into one log line each, so the gateway's log reads as a timeline; it is fed the backend's
timelines periodically and keeps no other state than what it already logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lambdascale.control.timeline import ScaleTimeline

log = logging.getLogger("lambdascale.serve.scale")


def milestones(tl: ScaleTimeline) -> list[tuple[str, float]]:
    """(milestone name, seconds since the decision) of everything reached so far, in time order."""
    out: list[tuple[str, float]] = [("decision", 0.0)]
    if tl.first_chunk_at is not None:
        out.append(("first chunk", tl.first_chunk_at - tl.decided_at))
    if tl.first_pipeline_at is not None:
        out.append(("first pipeline", tl.first_pipeline_at - tl.decided_at))
    for node, t in sorted(tl.node_full_at.items(), key=lambda kv: kv[1]):
        out.append((f"node {node} full", t - tl.decided_at))
    if tl.dissolved_at is not None:
        out.append(("pipelines dissolved", tl.dissolved_at - tl.decided_at))
    return sorted(out, key=lambda m: m[1])


def format_timeline(tl: ScaleTimeline) -> str:
    """One line for ``lambdascale status``: ``#3 llama -> [4, 5]: decision +0ms, first chunk +12ms, ...``."""
    parts = ", ".join(f"{name} +{dt * 1e3:.0f}ms" for name, dt in milestones(tl))
    return f"#{tl.event_id} {tl.model} -> {list(tl.targets)}: {parts}"


class TimelineLogger:
    """Logs each milestone of each scale event exactly once."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self._seen: dict[int, set[str]] = {}

    def observe(self, timelines: Iterable[ScaleTimeline]) -> int:
        """Log the new milestones; returns how many lines were written."""
        n = 0
        for tl in timelines:
            seen = self._seen.setdefault(tl.event_id, set())
            for name, dt in milestones(tl):
                if name in seen:
                    continue
                seen.add(name)
                n += 1
                self._log.info("scale event %d model=%s targets=%s: %s at +%.3f s",
                               tl.event_id, tl.model, list(tl.targets), name, dt)
        return n
