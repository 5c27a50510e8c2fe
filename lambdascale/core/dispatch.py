"""Late-binding dispatch of a deployment's queue onto its units.

The choice is the control plane's pure :func:`lambdascale.control.router.dispatch` (FIFO prefix,
no overtaking; least outstanding work among units with a free slot and room in their next step's
prefill budget), the policy the simulator runs too. This module only builds its inputs from the
units' live state and applies its answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lambdascale.control.router import QueuedRequest, Waiting, dispatch
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import InstanceState, InstanceView, ModelView, Stage
from lambdascale.core.state import Deployment, Request, Unit
from lambdascale.pipe.serving import KvPolicy


def unit_stages(u: Unit, n_blocks: int) -> tuple[Stage, ...]:
    """The control plane's stages of ``u`` (a full instance is one stage over every block)."""
    return tuple(Stage(n, a, b) for n, a, b in u.stages) or (Stage(u.node, 0, n_blocks),)


def kept_for_pipelines(units: Iterable[Unit], live: Iterable[Unit], policy: KvPolicy) -> dict[str, int]:
    """Slots of full instances kept for the requests of a live pipeline over their node.

    When a pipeline dissolves its requests' KV can only ship to a full instance with a free slot,
    so while it runs, each of its receivers' full instances among ``live`` keeps its share (the
    pipeline's requests over its receivers, rounded up) away from the queue. Helpers (sources
    lending a stage) keep nothing: their instances serve the queue the whole time. With
    ``recompute`` nothing is kept: moved requests go to the queue's head.
    """
    if policy is KvPolicy.RECOMPUTE:
        return {}
    full_on = {u.node: u.id for u in live if not u.pipelined}
    kept: dict[str, int] = {}
    for p in units:
        if not (p.pipelined and p.alive and p.server is not None and p.server.reqs):
            continue
        receivers = [n for n in p.nodes if n not in p.helpers]
        share = -(-len(p.server.reqs) // max(1, len(receivers)))
        for n in receivers:
            if n in full_on:
                kept[full_on[n]] = kept.get(full_on[n], 0) + share
    return kept


def plan_dispatch(dep: Deployment, requests: Mapping[str, Request], cfg: ControlSettings, now: float,
                  policy: KvPolicy) -> list[tuple[str, Unit]]:
    """Which queued requests of ``dep`` start on which unit now (oldest first).

    "Waiting" work of a unit is its admitted requests whose first step has not run (``computed
    == 0``); outstanding tokens count what is left to compute and generate.
    """
    units = {u.id: u for u in dep.serving if u.alive and u.server is not None and u.pipe is not None}
    if not units:
        return []
    kept = kept_for_pipelines(dep.units, units.values(), policy)
    views, waiting = [], {}
    for u in units.values():
        assert u.server is not None and u.pipe is not None  # filtered above
        reqs = list(u.server.reqs.values())
        fresh = [r for r in reqs if r.computed == 0]
        waiting[u.id] = Waiting(len(fresh), sum(len(r.all_ids) for r in fresh))
        todo = sum(len(r.all_ids) - r.computed + max(r.params.max_tokens - len(r.out), 0) for r in reqs)
        views.append(InstanceView(
            id=u.id, model=dep.name, state=InstanceState.PIPELINED if u.pipelined else InstanceState.FULL,
            stages=unit_stages(u, dep.manifest.n_blocks), capacity=u.pipe.max_seqs,
            outstanding_requests=len(reqs) + kept.get(u.id, 0), outstanding_tokens=todo, step_slots=u.pipe.slots))
    queue = []
    for rid in dep.queue:
        r = requests.get(rid)
        if r is None or r.done:
            continue
        n = len(r.prompt) + len(r.out)
        queue.append(QueuedRequest(rid, n, n + max(r.params.max_tokens - len(r.out), 0)))
    view = ModelView(name=dep.name, spec=dep.spec, size_bytes=dep.manifest.total_bytes,
                     n_blocks=dep.manifest.n_blocks, instances=tuple(views), queue_len=len(queue))
    res = dispatch(queue, view, cfg, now, waiting)
    return [(a.request_id, units[a.instance_id]) for a in res.assignments]
