"""Late-binding dispatch of a deployment's queue onto its units.

The choice is the control plane's pure :func:`lambdascale.control.router.dispatch` (FIFO prefix,
no overtaking; least outstanding work among units with a free slot and room in their next step's
prefill budget), the policy the simulator runs too. This module only builds its inputs from the
units' live state and applies its answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lambdascale.control.router import QueuedRequest, Waiting, dispatch, work_tokens
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import InstanceState, InstanceView, ModelView, Stage
from lambdascale.core.state import Deployment, Request, Unit
from lambdascale.pipe.serving import KvPolicy, kept_slots


def unit_stages(u: Unit, n_blocks: int) -> tuple[Stage, ...]:
    """The control plane's stages of ``u`` (a full instance is one stage over every block)."""
    return tuple(Stage(n, a, b) for n, a, b in u.stages) or (Stage(u.node, 0, n_blocks),)


def kept_for_pipelines(units: Iterable[Unit], live: Iterable[Unit], policy: KvPolicy) -> dict[str, int]:
    """Slots of full instances among ``live`` kept for the requests of a live pipeline among
    ``units`` over their node: :func:`lambdascale.pipe.serving.kept_slots` (the simulator's rule
    too) over the units' requests and receivers (stage nodes that are not helpers)."""
    full_on = {u.node: u.id for u in live if not u.pipelined}
    pipes = [(len(p.server.reqs), [n for n in p.nodes if n not in p.helpers])
             for p in units if p.pipelined and p.alive and p.server is not None]
    return kept_slots(pipes, full_on, policy)


def plan_dispatch(dep: Deployment, requests: Mapping[str, Request], cfg: ControlSettings, now: float,
                  policy: KvPolicy) -> list[tuple[str, Unit]]:
    """Which queued requests of ``dep`` start on which unit now (oldest first).

    "Waiting" work of a unit is its admitted requests whose first step has not run (``computed
    == 0``); outstanding tokens count what is left to compute and generate (``work_tokens``), a
    queued request's size is ``QueuedRequest.of``'s: the simulator's rules too.
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
        todo = sum(work_tokens(len(r.all_ids) - r.computed, r.params.max_tokens - len(r.out)) for r in reqs)
        views.append(InstanceView(
            id=u.id, model=dep.name, state=InstanceState.PIPELINED if u.pipelined else InstanceState.FULL,
            stages=unit_stages(u, dep.manifest.n_blocks), capacity=u.pipe.max_seqs,
            outstanding_requests=len(reqs) + kept.get(u.id, 0), outstanding_tokens=todo, step_slots=u.pipe.slots))
    queue = []
    for rid in dep.queue:
        r = requests.get(rid)
        if r is None or r.done:
            continue
        queue.append(QueuedRequest.of(rid, len(r.prompt) + len(r.out), r.params.max_tokens - len(r.out)))
    view = ModelView(name=dep.name, spec=dep.spec, size_bytes=dep.manifest.total_bytes,
                     n_blocks=dep.manifest.n_blocks, instances=tuple(views), queue_len=len(queue))
    res = dispatch(queue, view, cfg, now, waiting)
    return [(a.request_id, units[a.instance_id]) for a in res.assignments]
