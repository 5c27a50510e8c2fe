"""Memory manager: LRU with keep-alive, never evicts in use, never over-commits, copy-back."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from .control_factories import GB, clusters, hold, inst, model, node, snap
from lambdascale.control import (
    CACHE_TIERS,
    ControlSettings,
    DeploymentSpec,
    EvictReason,
    InstanceState,
    Tier,
    manage_memory,
)
from lambdascale.control.memory import in_use_models, is_in_use

CFG = ControlSettings()
HOST_ONLY = DeploymentSpec(cache_tiers=(Tier.HOST,), keep_alive_s=10.0)


def test_copy_back_after_scale_out() -> None:
    s = snap((node(0, holdings=(hold("m", Tier.GPU),)),), (model("m", (inst("a"),), spec=HOST_ONLY),))
    plan = manage_memory(s, CFG, 0.0)
    assert [(c.node, c.model, c.from_tier, c.to_tier, c.nbytes) for c in plan.copy_backs] == [(0, "m", Tier.GPU, Tier.HOST, 10 * GB)]
    assert manage_memory(s, ControlSettings(memory_copy_back=False), 0.0).is_noop


def test_copy_back_evicts_lru_expired_only() -> None:
    hs = (
        hold("m", Tier.GPU),
        hold("old", Tier.HOST, 6, last_used=1.0),
        hold("older", Tier.HOST, 6, last_used=0.5),
        hold("fresh", Tier.HOST, 6, last_used=95.0),
    )
    models = (model("m", (inst("a"),), spec=HOST_ONLY, last_request_at=99.0),) + tuple(
        model(n, spec=HOST_ONLY, size_gb=6, last_request_at=50.0) for n in ("old", "older", "fresh")
    )
    s = snap((node(0, host_gb=20, host_free_gb=2, holdings=hs),), models)
    plan = manage_memory(s, CFG, 100.0)
    assert [(e.model, e.reason) for e in plan.evictions] == [("older", EvictReason.MAKE_ROOM), ("old", EvictReason.MAKE_ROOM)]
    assert len(plan.copy_backs) == 1
    # Within keep-alive nothing may go, so the copy-back is skipped rather than over-committing.
    plan = manage_memory(s, CFG, 5.0)
    assert plan.is_noop
    # A hotter model's copy is never a victim for a colder one's copy-back.
    hot = tuple(replace(x, last_request_at=120.0) if x.name == "older" else x for x in models)
    plan = manage_memory(snap(s.nodes, hot), CFG, 100.0)
    assert plan.copy_backs == () and plan.evictions == ()  # "old" alone frees too little: nothing evicted


def test_never_evicts_in_use_even_if_undeployed() -> None:
    hs = (hold("gone", Tier.HOST), hold("gone2", Tier.HOST))
    s = snap((node(0, holdings=hs),), (model("gone2", (inst("x", "gone2"),)),))
    plan = manage_memory(s, CFG, 1000.0)
    assert [(e.model, e.reason) for e in plan.evictions] == [("gone", EvictReason.UNDEPLOYED)]


def test_source_of_a_loading_model_is_in_use() -> None:
    nodes = (node(0, holdings=(hold("m", Tier.HOST),)), node(1))
    m = model("m", (inst("l", nodes=(1,), state=InstanceState.LOADING),), spec=DeploymentSpec(cache_tiers=()))
    plan = manage_memory(snap(nodes, (m,)), CFG, 1000.0)
    assert plan.evictions == ()  # host copy on node 0 may be feeding the multicast


def test_tier_not_cached_and_idle_gpu_evicted() -> None:
    hs = (hold("m", Tier.SSD, last_used=0.0), hold("m", Tier.GPU, last_used=0.0))
    s = snap((node(0, ssd_gb=50, ssd_free_gb=40, holdings=hs),), (model("m", spec=HOST_ONLY),))
    reasons = {(e.tier, e.reason) for e in manage_memory(s, CFG, 1.0).evictions}
    assert reasons == {(Tier.SSD, EvictReason.TIER_NOT_CACHED), (Tier.GPU, EvictReason.TIER_NOT_CACHED)}
    # With gpu in cache_tiers an idle GPU copy stays warm until keep-alive expires.
    warm = DeploymentSpec(cache_tiers=(Tier.GPU, Tier.SSD), keep_alive_s=10.0)
    s = snap((node(0, ssd_gb=50, ssd_free_gb=40, holdings=hs),), (model("m", spec=warm),))
    assert manage_memory(s, CFG, 9.0).evictions == ()
    assert [(e.tier, e.reason) for e in manage_memory(s, CFG, 10.0).evictions] == [(Tier.GPU, EvictReason.IDLE_GPU)]


def test_copy_back_budget_counts_in_progress_copies() -> None:
    hs = (hold("a", Tier.GPU), hold("b", Tier.GPU), hold("c", Tier.HOST, blocks=frozenset({0})))
    models = tuple(model(n, (inst(n + "1", n),), spec=HOST_ONLY) for n in ("a", "b", "c"))
    s = snap((node(0, gpus=3, free=0, holdings=hs),), models)
    assert manage_memory(s, CFG, 0.0).copy_backs == ()
    assert len(manage_memory(s, ControlSettings(memory_max_copy_backs_per_node=3), 0.0).copy_backs) == 2


def test_hot_model_copied_back_first() -> None:
    hs = (hold("a", Tier.GPU), hold("b", Tier.GPU))
    models = (
        model("a", (inst("a1", "a"),), spec=HOST_ONLY, last_request_at=1.0),
        model("b", (inst("b1", "b"),), spec=HOST_ONLY, last_request_at=9.0),
    )
    s = snap((node(0, gpus=2, free=0, holdings=hs),), models)
    assert [c.model for c in manage_memory(s, CFG, 10.0).copy_backs] == ["b"]


@settings(max_examples=150, deadline=None)
@given(clusters(n_models=3), st.floats(0, 300), st.integers(1, 3))
def test_memory_properties(s, now, budget) -> None:  # type: ignore[no-untyped-def]
    cfg = ControlSettings(memory_max_copy_backs_per_node=budget)
    plan = manage_memory(s, cfg, now)
    for nd in s.nodes:
        on_node = in_use_models(s, nd)
        loading = {m.name for m in s.models if any(i.state is InstanceState.LOADING for i in m.instances)}
        ev = [e for e in plan.evictions if e.node == nd.id]
        cb = [c for c in plan.copy_backs if c.node == nd.id]
        for e in ev:
            h = nd.holding(e.model, e.tier)
            assert h is not None and not is_in_use(h, on_node, loading)  # never evicts in use
            assert e.model not in on_node
        assert len({(e.model, e.tier) for e in ev}) == len(ev)
        for t in CACHE_TIERS:
            freed = sum(e.nbytes for e in ev if e.tier is t)
            used = sum(c.nbytes for c in cb if c.to_tier is t)
            assert used <= nd.bytes_free(t) + freed  # never over-commits
            assert len([c for c in cb if c.to_tier is t]) <= budget
        for c in cb:
            src = nd.holding(c.model, c.from_tier)
            assert src is not None and src.complete
            assert nd.holding(c.model, c.to_tier) is None
            m = s.model(c.model)
            assert m is not None and c.to_tier in m.spec.cache_tiers
        for e in ev:
            if e.reason is EvictReason.MAKE_ROOM:
                m = s.model(e.model)
                ka = m.spec.keep_alive_s if m else cfg.memory_default_keep_alive_s
                assert now - nd.holding(e.model, e.tier).last_used >= ka  # type: ignore[union-attr]


def _apply(s, plan, now):  # type: ignore[no-untyped-def]
    """Apply a memory plan to a snapshot as a store would: evictions free room, copies land complete."""
    from lambdascale.control import ClusterSnapshot, Holding

    nodes = []
    for nd in s.nodes:
        gone = {(e.model, e.tier) for e in plan.evictions if e.node == nd.id}
        hs = [h for h in nd.holdings if (h.model, h.tier) not in gone]
        hs += [Holding(c.model, c.to_tier, c.nbytes, last_used=now) for c in plan.copy_backs if c.node == nd.id]
        def used(t):  # type: ignore[no-untyped-def]
            return sum(h.nbytes for h in hs if h.tier is t)
        nodes.append(replace(nd, holdings=tuple(hs), host_bytes_free=nd.host_bytes_total - used(Tier.HOST),
                             ssd_bytes_free=nd.ssd_bytes_total - used(Tier.SSD)))
    return ClusterSnapshot(tuple(nodes), s.models)


@settings(max_examples=80, deadline=None)
@given(clusters(n_models=3), st.floats(0, 300))
def test_memory_passes_converge_without_thrashing(s, now) -> None:  # type: ignore[no-untyped-def]
    """Applying plans at a fixed time reaches a no-op; every LRU eviction makes room for a hotter model."""
    cfg = ControlSettings(memory_max_copy_backs_per_node=1)

    def recency(name: str) -> float:
        m = s.model(name)
        return float("-inf") if m is None or m.last_request_at is None else m.last_request_at

    for _ in range(200):
        plan = manage_memory(s, cfg, now)
        if plan.is_noop:
            break
        for e in plan.evictions:
            if e.reason is EvictReason.MAKE_ROOM:
                gains = [c for c in plan.copy_backs if (c.node, c.to_tier) == (e.node, e.tier)]
                assert gains and all(recency(c.model) > recency(e.model) for c in gains)
        s = _apply(s, plan, now)
    else:
        raise AssertionError("memory manager did not converge in 200 passes")
