"""Placement: locality, sources, multi-source, never a node without free GPUs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from .control_factories import clusters, hold, inst, model, node, snap
from lambdascale.control import (
    ControlSettings,
    DeploymentSpec,
    MulticastAlgo,
    ScaleDecision,
    Tier,
    place,
    place_all,
    place_model,
)

CFG = ControlSettings()


def test_prefers_gpu_then_host_then_ssd_then_none() -> None:
    nodes = (
        node(0),
        node(1, holdings=(hold("m", Tier.SSD),), ssd_gb=100),
        node(2, holdings=(hold("m", Tier.HOST),)),
        node(3, gpus=2, free=1, holdings=(hold("m", Tier.GPU),)),
    )
    s = snap(nodes, (model("m", (inst("a", nodes=(3,)),)),))
    cfg = ControlSettings(placement_network_over_ssd=False)
    order = [t.node for t in place_model(s, s.models[0], 4, cfg, 0.0).targets]
    assert order == [3, 2, 1, 0]
    tiers = [t.local_tier for t in place_model(s, s.models[0], 4, cfg, 0.0).targets]
    assert tiers == [Tier.GPU, Tier.HOST, Tier.SSD, Tier.NONE]


def test_sources_prefer_gpu_holders_and_multi_source() -> None:
    nodes = (
        node(0, free=0, holdings=(hold("m", Tier.HOST),)),
        node(1, free=0, holdings=(hold("m", Tier.GPU),)),
        node(2, free=0, holdings=(hold("m", Tier.HOST),)),
        *(node(i) for i in range(3, 8)),
    )
    s = snap(nodes, (model("m"),))
    plan = place_model(s, s.models[0], 5, CFG, 0.0)
    assert plan.network_targets == (3, 4, 5, 6, 7)
    assert [(x.node, x.tier) for x in plan.sources] == [(1, Tier.GPU), (0, Tier.HOST), (2, Tier.HOST)]
    assert plan.multicast_nodes() == (1, 0, 2, 3, 4, 5, 6, 7)
    assert plan.execute_while_load and plan.algo is MulticastAlgo.BINOMIAL


def test_sources_capped_by_targets_and_setting() -> None:
    nodes = tuple(node(i, free=0, holdings=(hold("m", Tier.HOST),)) for i in range(4)) + (node(4), node(5))
    s = snap(nodes, (model("m"),))
    assert len(place_model(s, s.models[0], 1, CFG, 0.0).sources) == 1
    plan = place_model(s, s.models[0], 2, ControlSettings(placement_max_sources=1), 0.0)
    assert len(plan.sources) == 1 and plan.execute_while_load


def test_a_single_network_target_may_execute_while_load_too() -> None:
    # permission only: one receiver forms a pipeline with a source lending its device, none alone
    s = snap((node(0, free=0, holdings=(hold("m", Tier.GPU),)), node(1)), (model("m"),))
    plan = place_model(s, s.models[0], 1, CFG, 0.0)
    assert plan.network_targets == (1,) and plan.execute_while_load
    assert not place_model(s, s.models[0], 1, ControlSettings(placement_execute_while_load=False), 0.0).execute_while_load


def test_ssd_target_uses_network_when_a_memory_holder_exists() -> None:
    nodes = (node(0, free=0, holdings=(hold("m", Tier.HOST),)), node(1, ssd_gb=50, holdings=(hold("m", Tier.SSD),)))
    s = snap(nodes, (model("m"),))
    assert place_model(s, s.models[0], 1, CFG, 0.0).network_targets == (1,)
    only_ssd = snap((node(1, ssd_gb=50, holdings=(hold("m", Tier.SSD),)),), (model("m"),))
    plan = place_model(only_ssd, only_ssd.models[0], 1, CFG, 0.0)
    assert plan.targets[0].local_tier is Tier.SSD and plan.sources == ()


def test_peer_fetch_off_plans_no_sources() -> None:
    nodes = (node(0, free=0, holdings=(hold("m", Tier.GPU),)), node(1, ssd_gb=50, holdings=(hold("m", Tier.SSD),)), node(2))
    s = snap(nodes, (model("m"),))
    plan = place_model(s, s.models[0], 2, ControlSettings(placement_peer_fetch=False), 0.0)
    assert plan.sources == () and not plan.execute_while_load
    assert [(t.node, t.local_tier) for t in plan.targets] == [(1, Tier.SSD), (2, Tier.NONE)]


def test_no_holder_means_store_load_and_empty_multicast() -> None:
    s = snap((node(0), node(1)), (model("m"),))
    plan = place_model(s, s.models[0], 2, CFG, 0.0)
    assert plan.sources == () and plan.network_targets == (0, 1) and plan.multicast_nodes() == ()
    assert not plan.execute_while_load


def test_no_free_gpu_means_unplaced() -> None:
    s = snap((node(0, free=0), node(1, gpus=2, free=1)), (model("m", spec=DeploymentSpec(gpus_per_instance=2)),))
    plan = place_model(s, s.models[0], 2, CFG, 0.0)
    assert plan.targets == () and plan.unplaced == 2


def test_place_all_never_double_books_a_gpu() -> None:
    s = snap((node(0), node(1), node(2)), (model("a"), model("b")))
    ds = [ScaleDecision("a", 0, 2, add=2), ScaleDecision("b", 0, 2, add=2)]
    plans = place_all(s, ds, CFG, 0.0)
    used = [t.node for p in plans for t in p.targets]
    assert sorted(used) == [0, 1, 2] and plans[1].unplaced == 1


def test_spreads_over_nodes_before_stacking() -> None:
    s = snap((node(0, gpus=2), node(1, gpus=2)), (model("m"),))
    assert [t.node for t in place(s, ScaleDecision("m", 0, 2, add=2), CFG, 0.0).targets] == [0, 1]


@settings(max_examples=120, deadline=None)
@given(clusters(), st.integers(1, 8), st.booleans(), st.booleans())
def test_placement_properties(s, n, net_over_ssd, peer) -> None:  # type: ignore[no-untyped-def]
    cfg = ControlSettings(placement_network_over_ssd=net_over_ssd, placement_peer_fetch=peer)
    m = s.models[0]
    plan = place_model(s, m, n, cfg, 0.0)
    need = m.spec.gpus_per_instance
    free = {nd.id: nd.gpus_free for nd in s.nodes}
    for t in plan.targets:
        free[t.node] -= need
    assert all(v >= 0 for v in free.values())  # never over-books GPUs; no-GPU nodes never targets
    assert len(plan.targets) + plan.unplaced == n
    if plan.unplaced:
        assert all(v < need for v in free.values())  # unplaced only when nothing fits
    # Faster tiers first: no unchosen node with room has a faster tier than a chosen one.
    chosen = {t.node for t in plan.targets}
    tier = {nd.id: nd.fastest_tier(m.name) for nd in s.nodes}
    for nd in s.nodes:
        if nd.id not in chosen and nd.gpus_free >= need:
            assert all(tier[c].rank <= tier[nd.id].rank for c in chosen)
    # Sources: complete GPU/host holders, GPU before host, at most one per network target.
    ranks = [x.tier.rank for x in plan.sources]
    assert ranks == sorted(ranks)
    assert all(x.tier in (Tier.GPU, Tier.HOST) and tier[x.node] is x.tier for x in plan.sources)
    assert len(plan.sources) <= max(len(plan.network_targets), 0)
    assert not set(plan.network_targets) & {x.node for x in plan.sources}
    assert peer or plan.sources == ()
    for t in plan.targets:
        if t.local_tier is not Tier.NONE:
            assert t.local_tier is tier[t.node]
