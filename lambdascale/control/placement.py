"""Locality-aware placement: which nodes start new instances and which holders feed them.

Pure function of (snapshot, decision, config, now). Rules:

- A target needs ``spec.gpus_per_instance`` free GPUs; a node without them is never a target.
- Targets are chosen fastest local tier first (GPU > host > SSD > none), then nodes already
  running fewer instances of the model (spread), then more free GPUs, then node id. A node with
  several free GPUs may take several instances; within one tier, instances spread first.
- A target with a complete GPU or host copy loads locally. One whose best copy is on SSD loads
  locally too unless ``placement_network_over_ssd`` is set and a GPU/host holder exists, in which
  case it joins the multicast. The rest are *network targets*.
- Sources are the nodes holding a complete copy in GPU or host memory (GPU holders first, then
  host, then node id), at most ``placement_max_sources`` and at most one per network target;
  several sources give a multi-source plan. Targets that load locally from host count as
  sources too: host memory can feed the NIC while it feeds the local GPU.
- ``placement_peer_fetch=False`` (baselines without multicast) plans no sources at all: targets
  load from their own copy, SSD included, or from the model store.
- ``execute_while_load`` is set when configured and network targets receive blocks from sources.
  It permits pipelines; the data plane forms what the holdings allow: several receivers that
  together hold every block, or one receiver with sources that serve the model lending it their
  devices for the blocks it lacks (``runtime.pipeline_helper_blocks``). One receiver without
  lending forms none.

Example::

    plans = place_all(snapshot, [d for d in autoscale(snapshot, cfg, now) if d.add], cfg, now)
    for plan in plans:
        order = plan.multicast_nodes()   # sources first, then network targets
        ...

``place_all`` threads free-GPU accounting through several decisions so two models scaling in
the same tick never get the same GPU.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from lambdascale.control.decisions import ScaleDecision, ScalePlan, Source, Target
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import ClusterSnapshot, ModelView, NodeView
from lambdascale.control.spec import SOURCE_TIERS, Tier


def _instances_on(model: ModelView) -> dict[int, int]:
    """Counted instances of the model per node (for spreading)."""
    out: dict[int, int] = {}
    for inst in model.counted_instances:
        for node in set(inst.nodes):
            out[node] = out.get(node, 0) + 1
    return out


def place_model(
    snapshot: ClusterSnapshot,
    model: ModelView,
    n: int,
    cfg: ControlSettings,
    now: float,
    gpus_free: Mapping[int, int] | None = None,
) -> ScalePlan:
    """Plan ``n`` new instances of ``model``; ``gpus_free`` overrides the snapshot's free GPUs per node."""
    del now  # placement does not depend on time today; kept for the uniform policy signature
    free = {node.id: node.gpus_free for node in snapshot.nodes}
    if gpus_free is not None:
        free.update(gpus_free)
    need = model.spec.gpus_per_instance
    by_id: dict[int, NodeView] = {node.id: node for node in snapshot.nodes}
    running = _instances_on(model)
    tier_of = {nid: node.fastest_tier(model.name) for nid, node in by_id.items()}

    # Greedy, one instance at a time: the best node by (tier, instances of this model there, free
    # GPUs, id). Only the picked node's key changes after a pick, so a heap gives the same order
    # as re-ranking every node each time, in O((N + n) log N).
    def key(nid: int) -> tuple[int, int, int, int]:
        return (tier_of[nid].rank, running.get(nid, 0) + extra.get(nid, 0), -free[nid], nid)

    picked: list[Target] = []
    extra: dict[int, int] = {}
    heap = [key(nid) for nid in by_id if free[nid] >= need]
    heapq.heapify(heap)
    while heap and len(picked) < n:
        best = heapq.heappop(heap)[3]
        picked.append(Target(node=best, local_tier=tier_of[best], gpus=need))
        free[best] -= need
        extra[best] = extra.get(best, 0) + 1
        if free[best] >= need:
            heapq.heappush(heap, key(best))
    unplaced = n - len(picked)

    holders = [
        Source(node=nid, tier=tier_of[nid])
        for nid in sorted(by_id, key=lambda i: (tier_of[i].rank, i))
        if tier_of[nid] in SOURCE_TIERS
    ] if cfg.placement_peer_fetch else []
    targets: list[Target] = []
    for t in picked:
        if t.local_tier is Tier.SSD and cfg.placement_network_over_ssd and holders:
            t = Target(node=t.node, local_tier=Tier.NONE, gpus=t.gpus)
        targets.append(t)
    n_network = sum(1 for t in targets if t.local_tier is Tier.NONE)
    sources: tuple[Source, ...] = ()
    if n_network:
        network_nodes = {t.node for t in targets if t.local_tier is Tier.NONE}
        eligible = [s for s in holders if s.node not in network_nodes]
        sources = tuple(eligible[: min(cfg.placement_max_sources, n_network)])
    return ScalePlan(
        model=model.name,
        targets=tuple(targets),
        sources=sources,
        algo=cfg.placement_multicast_algo,
        execute_while_load=cfg.placement_execute_while_load and bool(sources),
        unplaced=unplaced,
    )


def place(snapshot: ClusterSnapshot, decision: ScaleDecision, cfg: ControlSettings, now: float) -> ScalePlan:
    """The plan for one scale-out decision (``decision.add`` new instances)."""
    model = snapshot.model(decision.model)
    if model is None:
        raise KeyError(f"placement: model {decision.model!r} is not in the snapshot")
    return place_model(snapshot, model, decision.add, cfg, now)


def place_all(
    snapshot: ClusterSnapshot, decisions: Iterable[ScaleDecision], cfg: ControlSettings, now: float
) -> tuple[ScalePlan, ...]:
    """Plans for every decision that adds instances, in order, never giving one GPU twice."""
    free = {node.id: node.gpus_free for node in snapshot.nodes}
    plans: list[ScalePlan] = []
    for d in decisions:
        if d.add <= 0:
            continue
        model = snapshot.model(d.model)
        if model is None:
            raise KeyError(f"placement: model {d.model!r} is not in the snapshot")
        plan = place_model(snapshot, model, d.add, cfg, now, gpus_free=free)
        for t in plan.targets:
            free[t.node] -= t.gpus
        plans.append(plan)
    return tuple(plans)


__all__ = ["place", "place_all", "place_model"]
