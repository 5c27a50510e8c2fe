"""Autoscaler: bounds, hysteresis, keep-alive and scale-to-zero."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from .control_factories import clusters, inst, model, specs
from lambdascale.control import (
    ControlSettings,
    DeploymentSpec,
    InstanceState,
    ModelView,
    ScaleReason,
    autoscale,
    autoscale_model,
)

CFG = ControlSettings()


def test_queue_on_zero_instances_starts_enough_at_once() -> None:
    m = model(spec=DeploymentSpec(max_instances=8, target_concurrency=4), queue_len=10, last_request_at=0.0)
    d = autoscale_model(m, CFG, now=0.0)
    assert (d.add, d.desired, d.reason) == (3, 3, ScaleReason.LOAD)  # ceil(10 / 4)


def test_max_instances_caps_scale_out() -> None:
    m = model(spec=DeploymentSpec(max_instances=2, target_concurrency=1), queue_len=50)
    assert autoscale_model(m, CFG, 0.0).desired == 2


def test_min_instances_started_without_load() -> None:
    m = model(spec=DeploymentSpec(min_instances=2, max_instances=4))
    d = autoscale_model(m, CFG, 0.0)
    assert (d.add, d.reason) == (2, ScaleReason.MIN_INSTANCES)


def test_no_scale_to_zero_keeps_one() -> None:
    m = model(spec=DeploymentSpec(scale_to_zero=False))
    assert autoscale_model(m, CFG, 0.0).add == 1


def test_lowered_max_removes_down_to_max_at_once() -> None:
    insts = tuple(inst(f"i{k}", nodes=(k,), busy=k % 2) for k in range(5))
    m = model(instances=insts, spec=DeploymentSpec(max_instances=2), in_flight=2, last_request_at=9.0, last_scale_at=9.0)
    d = autoscale_model(m, CFG, 10.0)
    assert d.reason is ScaleReason.MAX_INSTANCES and d.desired == 2
    assert set(d.remove) == {"i0", "i2", "i4"}  # the idle ones go first, regardless of cooldown


def test_scale_to_zero_only_after_keep_alive() -> None:
    m = model(instances=(inst("a"),), spec=DeploymentSpec(keep_alive_s=30.0), last_request_at=100.0, last_scale_at=0.0)
    assert autoscale_model(m, CFG, 129.9).is_noop
    d = autoscale_model(m, CFG, 130.0)
    assert d.remove == ("a",) and d.reason is ScaleReason.KEEP_ALIVE_EXPIRED


def test_scale_in_waits_for_cooldown_and_is_gradual() -> None:
    insts = tuple(inst(f"i{k}", nodes=(k,)) for k in range(4))
    m = model(instances=insts, spec=DeploymentSpec(target_concurrency=4, keep_alive_s=1000), in_flight=1,
              last_request_at=50.0, last_scale_at=45.0)
    cfg = ControlSettings(scale_down_cooldown_s=10.0, scale_max_remove_per_tick=2)
    assert autoscale_model(m, cfg, 54.0).is_noop
    d = autoscale_model(m, cfg, 55.0)
    assert d.reason is ScaleReason.UNDERLOADED and len(d.remove) == 2


def test_removal_prefers_idle_full_then_loading() -> None:
    insts = (
        inst("busy", nodes=(0,), busy=3),
        inst("idle-loading", nodes=(1,), state=InstanceState.LOADING),
        inst("idle-full", nodes=(2,)),
    )
    m = model(instances=insts, spec=DeploymentSpec(min_instances=0, keep_alive_s=0.0), last_request_at=0.0)
    d = autoscale_model(m, ControlSettings(scale_max_remove_per_tick=2), 100.0)
    assert d.remove == ("idle-full", "idle-loading")


def test_pipelines_and_draining_are_not_counted() -> None:
    insts = (
        inst("p", nodes=(0, 1), state=InstanceState.PIPELINED),
        inst("d", nodes=(2,), state=InstanceState.DRAINING),
        inst("l", nodes=(3,), state=InstanceState.LOADING),
    )
    m = model(instances=insts, in_flight=4, last_request_at=0.0)
    d = autoscale_model(m, CFG, 0.0)
    assert d.current == 1 and d.is_noop


def test_arrival_rate_scales_out_before_queue_builds() -> None:
    m = model(instances=(inst("a"),), spec=DeploymentSpec(target_concurrency=2), arrival_rate=10.0, service_time_s=0.8)
    assert autoscale_model(m, CFG, 0.0).desired == 4  # 10 req/s x 0.8 s = 8 concurrent / 2 per instance


def test_hysteresis_band_validated_with_field_names() -> None:
    import pytest
    from lambdascale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="scale_down_utilization"):
        load_config(overrides={"control.scale_down_utilization": 1.0, "control.scale_up_utilization": 1.0})


@settings(max_examples=120, deadline=None)
@given(clusters(), st.floats(0, 200))
def test_bounds_always_honoured(snap, now) -> None:  # type: ignore[no-untyped-def]
    for d in autoscale(snap, CFG, now):
        m = snap.model(d.model)
        assert m is not None
        assert d.desired <= max(m.spec.max_instances, d.current)
        assert d.desired <= m.spec.max_instances or d.add == 0
        assert d.desired == d.current + d.add - len(d.remove)
        counted = {i.id for i in m.counted_instances}
        assert set(d.remove) <= counted
        if d.current > m.spec.max_instances:
            assert d.desired == m.spec.max_instances
        # Scale-in below the floor never happens; scale-to-zero never within keep-alive.
        if d.remove and d.current <= m.spec.max_instances:
            assert d.desired >= m.spec.floor
            if d.desired == 0 and m.last_request_at is not None:
                assert now - m.last_request_at >= m.spec.keep_alive_s


def _apply(m: ModelView, d, now: float) -> ModelView:  # type: ignore[no-untyped-def]
    """Reflect a decision in the model view as a cluster would (new instances full at once)."""
    keep = tuple(i for i in m.instances if i.id not in d.remove)
    new = tuple(inst(f"n{now}-{k}", m.name, (0,)) for k in range(d.add))
    return replace(m, instances=keep + new, last_scale_at=now if not d.is_noop else m.last_scale_at)


@settings(max_examples=100, deadline=None)
@given(specs, st.integers(0, 60), st.integers(1, 4), st.sampled_from([1, 64]))
def test_no_flapping_under_steady_load(spec, load, start, max_remove) -> None:  # type: ignore[no-untyped-def]
    """Constant load: the count moves monotonically to one value and then never changes."""
    m = model(instances=tuple(inst(f"s{k}", nodes=(0,)) for k in range(start)), spec=spec,
              in_flight=load, last_request_at=0.0)
    cfg = ControlSettings(scale_down_cooldown_s=1.0, scale_max_remove_per_tick=max_remove)
    counts = []
    now = 0.0
    for _ in range(80):
        now += 0.5
        m = replace(m, last_request_at=now if load else m.last_request_at)
        d = autoscale_model(m, cfg, now)
        m = _apply(m, d, now)
        counts.append(len(m.counted_instances))
    direction_changes = sum(
        1 for a, b, c in zip(counts, counts[1:], counts[2:]) if (b - a) * (c - b) < 0
    )
    assert direction_changes == 0, counts
    final = counts[-1]
    assert counts[-20:] == [final] * 20
    t = spec.target_concurrency
    if load:
        lo = min(math.ceil(load / t), spec.max_instances)
        hi = min(spec.max_instances, max(spec.floor, math.ceil(load / (t * 0.5)), 1))
        assert lo <= final <= hi, (counts, lo, hi)
    else:
        assert min(spec.floor, spec.max_instances) <= final <= max(spec.floor, 1)
