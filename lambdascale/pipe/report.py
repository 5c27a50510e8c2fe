"""Tick-level summaries of a multicast plan: block ticks, pipelines formed tick by tick, and the
stable JSON documents that ``lambdascale plan`` prints (schema in docs/plan-json.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lambdascale.pipe.multicast_plan import MulticastPlan
from lambdascale.pipe.pipeline_types import PipelinePlan
from lambdascale.pipe.pipelines import PipelinePlanner

#: Bump when a field changes meaning or disappears (adding fields keeps the version).
JSON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PipelineTick:
    """The planner's decision at the end of round ``tick`` (only ticks where it changed)."""

    tick: int
    plan: PipelinePlan


def pipeline_ticks(plan: MulticastPlan) -> list[PipelineTick]:
    """Run the incremental planner over the receivers' block completions, tick by tick.

    All blocks completed in one tick are fed before the decision of that tick is recorded, so
    the answer matches :func:`~lambdascale.pipe.pipelines.plan_pipelines` on the holdings at
    that tick with the previous tick's pipelines as ``current``.
    """
    planner = PipelinePlanner(plan.receiver_nodes, plan.n_blocks)
    out: list[PipelineTick] = []
    events = plan.block_events()
    i = 0
    while i < len(events):
        tick = events[i][0]
        before = planner.plan.active
        before_solo = planner.plan.solo
        while i < len(events) and events[i][0] == tick:
            _, n, b = events[i]
            planner.on_block(n, b)
            i += 1
        # net effect within the tick: a pipeline formed and dissolved in the same tick is dropped
        after = planner.plan
        net_form = tuple(p for p in after.active if p not in before)
        net_dissolve = tuple(p for p in before if p not in after.active)
        if net_form or net_dissolve or after.solo != before_solo:
            merged = PipelinePlan(
                form=net_form,
                keep=tuple(p for p in after.active if p in before),
                dissolve=net_dissolve,
                solo=after.solo,
                planned=after.planned,
            )
            out.append(PipelineTick(tick, merged))
    return out


def first_pipeline_tick(plan: MulticastPlan) -> int | None:
    """First tick at which a cross-node pipeline (>= 2 nodes) runs among the receivers."""
    for pt in pipeline_ticks(plan):
        if any(p.size >= 2 for p in pt.plan.active):
            return pt.tick
    return None


def first_serving_tick(plan: MulticastPlan) -> int | None:
    """First tick at which any receiver instance (pipeline or solo node) can serve."""
    for pt in pipeline_ticks(plan):
        if pt.plan.instances > 0:
            return pt.tick
    return None


def _header(plan: MulticastPlan) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "algo": plan.algo.value,
        "nodes": plan.n_nodes,
        "sources": list(plan.sources),
        "receivers": list(plan.receiver_nodes),
        "blocks": plan.n_blocks,
        "chunks": plan.n_chunks,
        "gpus_per_node": plan.gpus_per_node,
        "nics_per_node": plan.nics_per_node,
    }


def multicast_json(plan: MulticastPlan, with_rounds: bool = True) -> dict[str, Any]:
    """The document ``lambdascale plan multicast --json`` prints."""
    ticks = pipeline_ticks(plan)
    doc = _header(plan)
    doc.update(
        {
            "kind": "multicast",
            "completion_tick": plan.completion_round,
            "all_blocks_tick": plan.all_blocks_round,
            "first_pipeline_tick": next((t.tick for t in ticks if any(p.size >= 2 for p in t.plan.active)), None),
            "first_serving_tick": next((t.tick for t in ticks if t.plan.instances > 0), None),
            "node_full_tick": {str(n): plan.node_full_round(n) for n in plan.receiver_nodes},
            "block_ticks": {str(n): list(bt) for n, bt in plan.node_block_ticks.items()},
            "source_orders": {str(s): list(o) for s, o in plan.source_orders.items()},
        }
    )
    if with_rounds:
        doc["rounds"] = [
            [[s.src, s.dst, s.chunk, s.kind.value] for s in rnd] for rnd in plan.rounds
        ]
    return doc


def pipelines_json(plan: MulticastPlan) -> dict[str, Any]:
    """The document ``lambdascale plan pipelines --json`` prints."""
    doc = _header(plan)
    ticks = pipeline_ticks(plan)
    doc.update(
        {
            "kind": "pipelines",
            "completion_tick": plan.completion_round,
            "all_blocks_tick": plan.all_blocks_round,
            "planned_sizes": list(ticks[0].plan.planned) if ticks else [],
            "ticks": [
                {
                    "tick": t.tick,
                    "form": [p.to_json() for p in t.plan.form],
                    "dissolve": [p.to_json() for p in t.plan.dissolve],
                    "active": [p.to_json() for p in t.plan.active],
                    "solo": list(t.plan.solo),
                    "instances": t.plan.instances,
                }
                for t in ticks
            ],
        }
    )
    return doc
