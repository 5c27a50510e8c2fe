"""Memory manager: which model copy lives in which tier on which node.

Pure function of (snapshot, config, now) returning a :class:`MemoryPlan`: evictions first, then
background copy-backs that fit once those evictions are done. Per node, deterministically:

1. A copy is *in use* (never evicted) when the model has an instance with a stage on that node
   (any state), when the copy is partial (a load or copy is writing it), when the holding is
   ``pinned``, or when it is a complete GPU/host copy of a model that is loading somewhere (it may
   be a multicast source right now).
2. Copies of models no longer deployed, or in a tier their spec does not list in ``cache_tiers``,
   are evicted when not in use. A GPU copy with no instance on its node is kept until idle past
   keep-alive when the spec lists ``gpu``, else dropped at once.
3. Copy-back (``memory_copy_back``): a node holding a complete GPU copy (a finished scale-out)
   copies the weights to each tier in ``spec.cache_tiers`` it lacks; a host copy also seeds a
   missing SSD copy. Hot models (latest request) go first; at most
   ``memory_max_copy_backs_per_node`` per node and tier are in progress (partial holdings count).
4. Room is made LRU: victims in that tier are copies not in use whose keep-alive has expired and
   whose model is colder (older last request) than the one being copied, coldest model first,
   then least recently used copy. If even all of them would not free enough room, nothing is
   evicted for that copy-back and it is skipped. Capacity is therefore never over-committed, and
   repeated passes converge: each pass only adds copies or trades colder copies for a hotter
   one, so a tier's contents rise in a finite order and cannot cycle.

Example::

    plan = manage_memory(snapshot, ControlSettings(), now)
    for e in plan.evictions: store.evict(e.node, e.model, e.tier)
    for c in plan.copy_backs: store.copy_in_background(c.node, c.model, c.from_tier, c.to_tier)

Actuators must treat a copy-back of a copy already in progress as a no-op: the plan is recomputed
every tick and sees an in-progress copy only once the store reports it as a partial holding.
"""

from __future__ import annotations

from collections.abc import Collection

from lambdascale.control.decisions import CopyBack, EvictReason, Eviction, MemoryPlan
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import ClusterSnapshot, Holding, ModelView, NodeView
from lambdascale.control.spec import CACHE_TIERS, SOURCE_TIERS, InstanceState, Tier


def models_by_node(snapshot: ClusterSnapshot) -> dict[int, set[str]]:
    """For every node, the models with an instance stage on it (any state); one pass over instances."""
    out: dict[int, set[str]] = {n.id: set() for n in snapshot.nodes}
    for m in snapshot.models:
        for inst in m.instances:
            for stage in inst.stages:
                out.setdefault(stage.node, set()).add(m.name)
    return out


def in_use_models(snapshot: ClusterSnapshot, node: NodeView) -> set[str]:
    """Models with an instance stage on ``node`` (any state)."""
    return models_by_node(snapshot).get(node.id, set())


def _loading_models(snapshot: ClusterSnapshot) -> set[str]:
    return {
        m.name for m in snapshot.models if any(i.state is InstanceState.LOADING for i in m.instances)
    }


def is_in_use(holding: Holding, on_node: set[str], loading: set[str]) -> bool:
    """True when ``holding`` must not be evicted (see rule 1 of the module docstring)."""
    if holding.pinned or not holding.complete or holding.model in on_node:
        return True
    return holding.model in loading and holding.tier in SOURCE_TIERS


def _hotness(m: ModelView) -> tuple[float, str]:
    """Sort key: most recent request first, then name."""
    return (-(m.last_request_at if m.last_request_at is not None else float("-inf")), m.name)


def _colder(victim: ModelView | None, model: ModelView) -> bool:
    """True when ``victim``'s last request is strictly older than ``model``'s (None = never).

    Making room only for a hotter model means a copy-back can never evict a copy that would in
    turn evict it back: repeated passes reach a fixed point instead of thrashing.
    """
    return victim is None or _recency(victim) < _recency(model)


def _recency(model: ModelView | None) -> float:
    """The model's last request time; -inf for never or undeployed."""
    if model is None or model.last_request_at is None:
        return float("-inf")
    return model.last_request_at


def _keep_alive(model: ModelView | None, cfg: ControlSettings) -> float:
    return model.spec.keep_alive_s if model is not None else cfg.memory_default_keep_alive_s


def _plan_node(
    node: NodeView,
    on_node: set[str],
    models: dict[str, ModelView],
    by_hotness: list[ModelView],
    loading: set[str],
    cfg: ControlSettings,
    now: float,
) -> tuple[list[Eviction], list[CopyBack]]:
    held = {(h.model, h.tier): h for h in node.holdings}
    evictions: list[Eviction] = []
    evicted: set[tuple[str, Tier]] = set()
    free = {t: node.bytes_free(t) for t in CACHE_TIERS}

    def evict(h: Holding, reason: EvictReason) -> None:
        evictions.append(Eviction(node.id, h.model, h.tier, h.nbytes, reason))
        evicted.add((h.model, h.tier))
        if h.tier in free:
            free[h.tier] += h.nbytes

    # Rule 2: stale copies.
    for h in sorted(node.holdings, key=lambda h: (h.tier.rank, h.model)):
        if is_in_use(h, on_node, loading):
            continue
        m = models.get(h.model)
        if h.tier is Tier.GPU and m is not None and Tier.GPU in m.spec.cache_tiers:
            if now - h.last_used >= _keep_alive(m, cfg):
                evict(h, EvictReason.IDLE_GPU)
        elif m is None:
            evict(h, EvictReason.UNDEPLOYED)
        elif h.tier not in m.spec.cache_tiers:
            evict(h, EvictReason.TIER_NOT_CACHED)

    copy_backs: list[CopyBack] = []
    if not cfg.memory_copy_back:
        return evictions, copy_backs

    # Rule 3: wanted copy-backs, hottest model first.
    for tier in CACHE_TIERS:
        in_progress = sum(1 for h in node.holdings if h.tier is tier and not h.complete)
        budget = cfg.memory_max_copy_backs_per_node - in_progress
        # Rule 4's candidates in LRU order, sorted once per tier (the order does not depend on
        # the model being copied; which of them are colder than it is filtered per model).
        lru: list[Holding] | None = None
        for m in by_hotness:
            if budget <= 0:
                break
            if tier not in m.spec.cache_tiers or (m.name, tier) in held:
                continue
            src = held.get((m.name, Tier.GPU))
            if src is None or not src.complete or (m.name, Tier.GPU) in evicted:
                src = held.get((m.name, Tier.HOST)) if tier is Tier.SSD else None
                if src is None or not src.complete or (m.name, Tier.HOST) in evicted:
                    continue
            need = m.size_bytes
            if need > node.bytes_total(tier):
                continue  # can never fit on this node
            if need > free[tier]:
                # Rule 4: LRU victims among expired, unused copies of this tier.
                if lru is None:
                    lru = sorted(
                        (
                            h
                            for h in node.holdings
                            if h.tier is tier
                            and not is_in_use(h, on_node, loading)
                            and now - h.last_used >= _keep_alive(models.get(h.model), cfg)
                        ),
                        key=lambda h: (_recency(models.get(h.model)), h.last_used, h.model),
                    )
                victims = [h for h in lru if (h.model, h.tier) not in evicted and h.model != m.name
                           and _colder(models.get(h.model), m)]
                chosen: list[Holding] = []
                room = free[tier]
                for v in victims:
                    if room >= need:
                        break
                    chosen.append(v)
                    room += v.nbytes
                if room < need:
                    continue
                for v in chosen:
                    evict(v, EvictReason.MAKE_ROOM)
            free[tier] -= need
            copy_backs.append(CopyBack(node.id, m.name, src.tier, tier, need))
            budget -= 1
    return evictions, copy_backs


def manage_memory(snapshot: ClusterSnapshot, cfg: ControlSettings, now: float,
                  nodes: Collection[int] | None = None) -> MemoryPlan:
    """Evictions and background copy-backs for every node (nodes in id order); ``nodes``: only
    those node ids (each node's plan depends on its own holdings and the models alone, so a
    caller that knows a node's plan cannot have changed may leave it out)."""
    models = {m.name: m for m in snapshot.models}
    by_hotness = sorted(models.values(), key=_hotness)
    loading = _loading_models(snapshot)
    on_nodes = models_by_node(snapshot)
    evictions: list[Eviction] = []
    copy_backs: list[CopyBack] = []
    for node in sorted(snapshot.nodes, key=lambda n: n.id):
        if nodes is not None and node.id not in nodes:
            continue
        e, c = _plan_node(node, on_nodes.get(node.id, set()), models, by_hotness, loading, cfg, now)
        evictions.extend(e)
        copy_backs.extend(c)
    return MemoryPlan(evictions=tuple(evictions), copy_backs=tuple(copy_backs))


__all__ = ["in_use_models", "is_in_use", "manage_memory", "models_by_node"]
