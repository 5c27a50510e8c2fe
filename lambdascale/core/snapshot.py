"""The control plane's view of the core's cluster: nodes with their tiers, models with their units.

One GPU slot per node (a node with a full instance has none free); holdings from the agents'
reports (:class:`~lambdascale.core.memory.NodeMemory`). Units on a dead node (or formed on an
incarnation that is gone) and draining units are left out: the autoscaler must not count them. A
suspect node is listed with no free GPU and no holdings: nothing new goes there and it is no
multicast source; a dead one is not listed at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lambdascale.control.snapshot import ClusterSnapshot, Holding, InstanceState, InstanceView, ModelView, NodeView
from lambdascale.control.snapshot import Tier as CTier
from lambdascale.core.dispatch import unit_stages

if TYPE_CHECKING:
    from lambdascale.core.core import ServingCore

#: host memory of a node before its agent reported any (effectively unbounded)
_UNREPORTED_HOST_BYTES = 1 << 50


def build_snapshot(core: "ServingCore") -> ClusterSnapshot:
    alive = set(core.cluster.alive())
    healthy = set(core.cluster.healthy())
    busy = {u.node for d in core.deployments.values() for u in d.units if not u.pipelined}
    now = core.clock.now()
    core.memory.poll()  # fresh holdings for the next pass
    nodes = []
    for n in sorted(alive):
        if n not in healthy:  # suspect: its units stay counted, but it takes nothing new and is no source
            nodes.append(NodeView(id=n, gpus_total=1, gpus_free=0, host_bytes_total=0, host_bytes_free=0))
            continue
        tiers = core.memory.node_tiers(n, now)
        if tiers is not None:
            hs, h_tot, h_free, s_tot, s_free = tiers
            nodes.append(NodeView(id=n, gpus_total=1, gpus_free=0 if n in busy else 1, host_bytes_total=h_tot,
                                  host_bytes_free=h_free, ssd_bytes_total=s_tot, ssd_bytes_free=s_free, holdings=hs))
            continue
        held = [core.deployments[m] for m in sorted(core.memory.held.get(n, ())) if m in core.deployments]
        used = sum(d.manifest.total_bytes for d in held)
        nodes.append(NodeView(
            id=n, gpus_total=1, gpus_free=0 if n in busy else 1,
            host_bytes_total=_UNREPORTED_HOST_BYTES, host_bytes_free=_UNREPORTED_HOST_BYTES - used,
            holdings=tuple(Holding(d.name, CTier.HOST, d.manifest.total_bytes, last_used=d.last_request_at or 0.0)
                           for d in held)))
    models = []
    for d in core.deployments.values():
        insts = []
        for u in d.units:
            if any(n not in alive for n in u.nodes) or u.draining or not all(
                    core.cluster.is_current(n, inc) for n, inc in u.members.items()):
                continue
            n_run = len(u.server.reqs) if u.server is not None else 0
            state = InstanceState.LOADING if u.loading else (
                InstanceState.PIPELINED if u.pipelined else InstanceState.FULL)
            insts.append(InstanceView(id=u.id, model=d.name, state=state, stages=unit_stages(u, d.manifest.n_blocks),
                                      capacity=core.settings.max_seqs, outstanding_requests=n_run))
        models.append(ModelView(
            name=d.name, spec=d.spec, size_bytes=d.manifest.total_bytes, n_blocks=d.manifest.n_blocks,
            instances=tuple(insts), queue_len=len(d.queue), in_flight=sum(v.outstanding_requests for v in insts),
            last_request_at=d.last_request_at))
    return ClusterSnapshot(nodes=tuple(nodes), models=tuple(models))
