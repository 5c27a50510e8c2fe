"""Controller loop with a fake actuator and a ManualClock; the scale timeline record."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from .control_factories import hold, inst, model, node, snap
from lambdascale.clock import ManualClock
from lambdascale.control import (
    ClusterSnapshot,
    Controller,
    ControlSettings,
    DeploymentSpec,
    MemoryPlan,
    ScalePlan,
    ScaleTimeline,
    Tier,
)


class FakeActuator:
    """Records every call; can be told to fail one action."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fail = fail

    def _rec(self, action: str, arg: object) -> None:
        self.calls.append((action, arg))
        if action == self.fail:
            raise RuntimeError(f"{action} exploded")

    def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None:
        self._rec("scale_out", (plan, timeline))

    def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None:
        self._rec("remove_instances", (model, instance_ids))

    def apply_memory(self, plan: MemoryPlan) -> None:
        self._rec("apply_memory", plan)


class Cluster:
    """A mutable holder of the current snapshot (what the observer reads)."""

    def __init__(self, s: ClusterSnapshot) -> None:
        self.s = s

    def snapshot(self) -> ClusterSnapshot:
        return self.s


def _cluster(queue: int = 5) -> Cluster:
    nodes = (node(0, free=0, holdings=(hold("m", Tier.HOST),)), node(1), node(2), node(3))
    spec = DeploymentSpec(max_instances=3, target_concurrency=2, keep_alive_s=5.0, cache_tiers=(Tier.HOST,))
    return Cluster(snap(nodes, (model("m", spec=spec, queue_len=queue, last_request_at=0.0),)))


def test_step_scales_out_with_timeline_from_the_clock() -> None:
    cluster, act, clock = _cluster(), FakeActuator(), ManualClock(10.0)
    ctl = Controller(cluster.snapshot, act, ControlSettings(), clock)
    res = ctl.step()
    assert res.errors == ()
    (action, (plan, tl)), = act.calls
    assert action == "scale_out" and plan.network_targets == (1, 2, 3) and plan.sources[0].node == 0
    assert tl.decided_at == 10.0 and tl.targets == (1, 2, 3) and res.timelines == (tl,)
    clock.advance(0.2)
    tl.mark_first_chunk(clock.now())
    tl.mark_first_pipeline(clock.now() + 0.1)
    for n in (1, 2, 3):
        tl.mark_node_full(n, clock.now() + 0.3)
    tl.mark_dissolved(clock.now() + 0.35)
    rec = tl.to_dict()
    assert rec["first_chunk_s"] == pytest.approx(0.2) and rec["all_full_s"] == pytest.approx(0.5)
    assert tl.complete and list(ctl.timelines) == [tl]


def test_scale_in_respects_cooldown_tracked_by_the_controller() -> None:
    cluster, act, clock = _cluster(queue=0), FakeActuator(), ManualClock(0.0)
    cfg = ControlSettings(scale_down_cooldown_s=3.0)
    m = cluster.s.models[0]
    cluster.s = replace(cluster.s, models=(replace(m, in_flight=6, queue_len=0),))
    ctl = Controller(cluster.snapshot, act, cfg, clock)
    ctl.step()  # scale out to 3 at t=0
    assert act.calls[-1][0] == "scale_out"
    # The cluster now runs three idle full instances, the observer knows no scale times.
    insts = tuple(inst(f"i{k}", nodes=(k,)) for k in (1, 2, 3))
    nodes = tuple(replace(n, gpus_free=0) for n in cluster.s.nodes)
    cluster.s = replace(cluster.s, nodes=nodes, models=(replace(m, instances=insts, in_flight=1, last_request_at=0.0),))
    act.calls.clear()
    clock.set(2.0)
    assert ctl.step().decisions.scale[0].is_noop and act.calls == []  # cooldown from the controller's own record
    clock.set(3.0)
    ctl.step()
    assert act.calls == [("remove_instances", ("m", ("i1", "i2")))]  # load 1 fits one instance at <= 50%


def test_failing_action_is_recorded_and_others_still_run() -> None:
    cluster = _cluster()
    gpu_node = node(4, gpus=1, free=0, holdings=(hold("m", Tier.GPU),))
    m = replace(cluster.s.models[0], instances=(inst("g", nodes=(4,)),), queue_len=8)
    cluster.s = replace(cluster.s, nodes=cluster.s.nodes + (gpu_node,), models=(m,))
    act = FakeActuator(fail="apply_memory")
    ctl = Controller(cluster.snapshot, act, ControlSettings(), ManualClock())
    res = ctl.step()
    assert [c[0] for c in act.calls] == ["apply_memory", "scale_out"]
    assert len(res.errors) == 1 and res.errors[0].action == "apply_memory" and "exploded" in res.errors[0].message
    # A failed scale-out leaves no timeline and no cooldown: the next pass retries.
    act2 = FakeActuator(fail="scale_out")
    ctl2 = Controller(_cluster().snapshot, act2, ControlSettings(), ManualClock())
    assert ctl2.step().timelines == () and not ctl2.timelines
    assert [c[0] for c in act2.calls] == ["scale_out"]
    ctl2.step()
    assert [c[0] for c in act2.calls] == ["scale_out", "scale_out"]


def test_sync_step_refuses_async_actuator() -> None:
    class AsyncAct(FakeActuator):
        async def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None:  # type: ignore[override]
            self.calls.append(("scale_out", plan))

    ctl = Controller(_cluster().snapshot, AsyncAct(), ControlSettings(), ManualClock())
    res = ctl.step()
    assert res.errors and "astep" in res.errors[0].message


def test_run_loop_ticks_on_the_injected_clock_and_stops() -> None:
    class SteppingClock(ManualClock):
        """A clock whose sleep advances simulated time (no wall-clock waiting)."""

        async def sleep(self, seconds: float) -> None:
            self.advance(seconds)
            await asyncio.sleep(0)

    class AsyncAct(FakeActuator):
        async def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None:  # type: ignore[override]
            self.calls.append(("scale_out", timeline.decided_at))

    clock = SteppingClock(100.0)
    act = AsyncAct()
    ticks: list[float] = []
    stop = asyncio.Event()

    def on_tick(res) -> None:  # type: ignore[no-untyped-def]
        ticks.append(res.decisions.now)
        if len(ticks) == 4:
            stop.set()

    ctl = Controller(_cluster().snapshot, act, ControlSettings(autoscale_interval_s=0.5), clock)
    asyncio.run(asyncio.wait_for(ctl.run(stop, on_tick), timeout=5))
    assert ticks == [100.0, 100.5, 101.0, 101.5]
    assert act.calls[0] == ("scale_out", 100.0) and len(act.calls) == 4  # same snapshot: retried every tick


def test_timeline_rejects_times_before_the_decision_and_unknown_nodes() -> None:
    tl = ScaleTimeline(1, "m", 5.0, (1, 2))
    with pytest.raises(ValueError, match="first chunk at 4.0 precedes"):
        tl.mark_first_chunk(4.0)
    with pytest.raises(ValueError, match="node 9 is not a target"):
        tl.mark_node_full(9, 6.0)
    tl.mark_node_full(1, 6.0)
    tl.mark_node_full(1, 7.0)  # first write wins
    assert tl.node_full_at == {1: 6.0} and tl.all_full_at is None and not tl.complete


def test_no_free_gpu_warns_once_and_calls_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cluster = _cluster()
    cluster.s = replace(cluster.s, nodes=tuple(replace(n, gpus_free=0) for n in cluster.s.nodes))
    act = FakeActuator()
    ctl = Controller(cluster.snapshot, act, ControlSettings(), ManualClock())
    with caplog.at_level("WARNING", logger="lambdascale.control.controller"):
        for _ in range(3):
            res = ctl.step()
    assert act.calls == [] and res.decisions.plans[0].unplaced == 3
    assert sum("no node has free GPUs" in r.message for r in caplog.records) == 1
