"""Execution-pipeline types: a :class:`Pipeline` (which node runs which block), its
:class:`Stage` runs, and the planner's answer, a :class:`PipelinePlan`. The planner that makes
them is :mod:`lambdascale.pipe.pipelines`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Stage:
    """A run of consecutive blocks ``[start, end)`` executed on ``node``."""

    start: int
    end: int
    node: int

    @property
    def n_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Pipeline:
    """An execution pipeline: ``assignment[b]`` is the node that runs block ``b``.

    Requests flow through blocks ``0..B-1`` in order; a node may run several non-adjacent blocks
    (it keeps the KV cache of all its layers), so the hop sequence is :attr:`stages`, the runs of
    consecutive blocks on one node. The pipeline's *size* is its number of distinct nodes; their
    loads (blocks per node) differ by at most one.
    """

    assignment: tuple[int, ...]

    @property
    def nodes(self) -> tuple[int, ...]:
        """Distinct nodes in order of first appearance."""
        return tuple(dict.fromkeys(self.assignment))

    @property
    def size(self) -> int:
        return len(set(self.assignment))

    @property
    def stages(self) -> tuple[Stage, ...]:
        out: list[Stage] = []
        start = 0
        for b in range(1, len(self.assignment) + 1):
            if b == len(self.assignment) or self.assignment[b] != self.assignment[start]:
                out.append(Stage(start, b, self.assignment[start]))
                start = b
        return tuple(out)

    def loads(self) -> dict[int, int]:
        """node -> number of blocks it runs."""
        out: dict[int, int] = {}
        for v in self.assignment:
            out[v] = out.get(v, 0) + 1
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "nodes": list(self.nodes),
            "assignment": list(self.assignment),
            "stages": [{"node": st.node, "start": st.start, "end": st.end} for st in self.stages],
        }


@dataclass(frozen=True)
class PipelinePlan:
    """The planner's answer: pipelines to form now, to keep, to dissolve; solo-capable nodes."""

    form: tuple[Pipeline, ...]
    keep: tuple[Pipeline, ...]
    dissolve: tuple[Pipeline, ...]
    solo: tuple[int, ...]
    planned: tuple[int, ...]

    @property
    def active(self) -> tuple[Pipeline, ...]:
        """Pipelines running after this decision (kept, then newly formed)."""
        return self.keep + self.form

    @property
    def instances(self) -> int:
        """Serving instances after this decision: active pipelines plus solo nodes."""
        return len(self.keep) + len(self.form) + len(self.solo)

    @property
    def changed(self) -> bool:
        return bool(self.form or self.dissolve)


__all__ = ["Pipeline", "PipelinePlan", "Stage"]
