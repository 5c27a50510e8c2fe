"""Router: least outstanding work, pipelines while scaling, bounded hold, clear rejects."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from .control_factories import inst, model, node, snap
from lambdascale.control import (
    ControlSettings,
    DeploymentSpec,
    InstanceState,
    RejectReason,
    RouteKind,
    RouteMetric,
    route,
    route_many,
    route_model,
)

CFG = ControlSettings(router_max_held=3)


def test_least_outstanding_full_instance() -> None:
    m = model(instances=(inst("a", busy=3), inst("b", nodes=(1,), busy=1), inst("c", nodes=(2,), busy=2)))
    assert route_model(m, CFG, 0.0).instance_id == "b"


def test_normalised_by_capacity_and_full_beats_pipeline_on_ties() -> None:
    m = model(instances=(
        inst("pipe", nodes=(0, 1), state=InstanceState.PIPELINED, capacity=2, busy=1),
        inst("full", nodes=(2,), capacity=4, busy=2),
    ))
    assert route_model(m, CFG, 0.0).instance_id == "full"


def test_pipeline_used_while_scaling_and_loading_never() -> None:
    m = model(instances=(
        inst("l", nodes=(0,), state=InstanceState.LOADING),
        inst("p", nodes=(1, 2), state=InstanceState.PIPELINED, capacity=2),
        inst("d", nodes=(3,), state=InstanceState.DRAINING),
    ))
    assert route_model(m, CFG, 0.0).instance_id == "p"


def test_tokens_metric() -> None:
    m = model(instances=(inst("a", busy=1, tokens=900), inst("b", nodes=(1,), busy=3, tokens=100)))
    assert route_model(m, ControlSettings(router_metric=RouteMetric.TOKENS), 0.0).instance_id == "b"
    assert route_model(m, CFG, 0.0).instance_id == "a"


def test_zero_instances_hold_until_bound_then_reject() -> None:
    for q, kind in [(0, RouteKind.HOLD), (2, RouteKind.HOLD), (3, RouteKind.REJECT)]:
        d = route_model(model(queue_len=q), CFG, 0.0)
        assert d.kind is kind
    d = route_model(model(queue_len=3), CFG, 0.0)
    assert d.reject_reason is RejectReason.HOLD_QUEUE_FULL and "router_max_held=3" in d.detail


def test_all_busy_holds() -> None:
    d = route_model(model(instances=(inst("a", capacity=1, busy=1),)), CFG, 0.0)
    assert d.kind is RouteKind.HOLD and "busy" in d.detail


def test_unknown_and_unscalable_models_rejected() -> None:
    s = snap((node(0),), (model("m", spec=DeploymentSpec(max_instances=0)),))
    d = route(s, "nope", CFG, 0.0)
    assert d.reject_reason is RejectReason.UNKNOWN_MODEL and "deployed: m" in d.detail
    assert route(s, "m", CFG, 0.0).reject_reason is RejectReason.NOT_SCALABLE


def test_route_many_spreads_a_burst_and_respects_the_hold_bound() -> None:
    m = model(instances=(inst("a", capacity=2), inst("b", nodes=(1,), capacity=2)))
    ds = route_many(m, 8, CFG, 0.0)
    assert [d.instance_id for d in ds[:4]] == ["a", "b", "a", "b"]
    assert [d.kind for d in ds[4:]] == [RouteKind.HOLD] * 3 + [RouteKind.REJECT]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4), st.booleans()), min_size=0, max_size=6),
    st.integers(0, 10),
    st.integers(0, 6),
)
def test_router_properties(shape, queue, bound) -> None:  # type: ignore[no-untyped-def]
    insts = tuple(
        inst(f"i{k}", nodes=(k,), capacity=c, busy=min(b, c), state=InstanceState.PIPELINED if p else InstanceState.FULL)
        for k, (c, b, p) in enumerate(shape)
    )
    m = model(instances=insts, queue_len=queue)
    cfg = ControlSettings(router_max_held=bound)
    d = route_model(m, cfg, 0.0)
    free = [i for i in insts if i.outstanding_requests < i.capacity]
    if free:
        chosen = m.instance(d.instance_id or "")
        assert chosen is not None and chosen in free
        assert all(chosen.outstanding_requests / chosen.capacity <= i.outstanding_requests / i.capacity for i in free)
    elif queue < bound:
        assert d.kind is RouteKind.HOLD
    else:
        assert d.kind is RouteKind.REJECT and d.reject_reason is RejectReason.HOLD_QUEUE_FULL


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4)), max_size=5), st.integers(0, 8), st.integers(0, 8),
       st.integers(0, 30))
def test_route_many_never_overfills_slots_or_the_hold_queue(shape, queue, bound, n) -> None:  # type: ignore[no-untyped-def]
    insts = tuple(inst(f"i{k}", nodes=(k,), capacity=c, busy=min(b, c)) for k, (c, b) in enumerate(shape))
    m = model(instances=insts, queue_len=queue)
    ds = route_many(m, n, ControlSettings(router_max_held=bound), 0.0)
    for i in insts:
        assert i.outstanding_requests + sum(d.instance_id == i.id for d in ds) <= i.capacity
    free_slots = sum(i.capacity - i.outstanding_requests for i in insts)
    assert sum(d.kind is RouteKind.INSTANCE for d in ds) == min(n, free_slots)  # no slot left idle
    assert sum(d.kind is RouteKind.HOLD for d in ds) == min(max(0, bound - queue), n - min(n, free_slots))
