"""Closed loop: the Controller drives a tiny fake cluster through burst -> serve -> idle -> zero -> burst.

The fake cluster applies what the actuator is told (instances load in 0.1 s from a local host copy,
0.3 s over the network; copy-backs land at once) and reports a fresh snapshot each tick. The test
checks the story the design promises: a burst scales out to the load, weights are copied back to
host memory after the scale-out, idle instances go after the cooldown and the last one after
keep-alive, and the next burst starts every instance from a local host copy. Invariants are
checked on every tick: GPUs never over-booked, host memory never over-committed, max never exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdascale.clock import ManualClock
from lambdascale.control import (
    ClusterSnapshot,
    Controller,
    ControlSettings,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    MemoryPlan,
    ModelView,
    NodeView,
    ScalePlan,
    ScaleTimeline,
    Stage,
    Tier,
)

GB = 1 << 30
SIZE = 10 * GB
HOST = 25 * GB
SPEC = DeploymentSpec(min_instances=0, max_instances=4, target_concurrency=4, keep_alive_s=20.0, cache_tiers=(Tier.HOST,))


@dataclass
class Inst:
    id: str
    node: int
    ready_at: float
    timeline: ScaleTimeline
    full: bool = False


class FakeCluster:
    """Four 1-GPU nodes; model 'm' starts cached in node 0's host memory."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.holdings: dict[int, dict[Tier, Holding]] = {i: {} for i in range(4)}
        self.holdings[0][Tier.HOST] = Holding("m", Tier.HOST, SIZE, last_used=0.0)
        self.insts: dict[str, Inst] = {}
        self.seq = 0
        self.in_flight = 0
        self.last_request_at: float | None = None
        self.plans: list[ScalePlan] = []
        self.copies: list[tuple[int, float]] = []

    # -- observer --
    def snapshot(self) -> ClusterSnapshot:
        now = self.clock.now()
        for i in self.insts.values():
            if not i.full and now >= i.ready_at:
                i.full = True
                self.holdings[i.node][Tier.GPU] = Holding("m", Tier.GPU, SIZE, last_used=now)
                i.timeline.mark_node_full(i.node, i.ready_at)
        full = [i for i in self.insts.values() if i.full]
        views, left = [], self.in_flight
        for k, i in enumerate(sorted(self.insts.values(), key=lambda x: x.id)):
            busy = 0
            if i.full:
                busy = min(4, left)
                left -= busy
            views.append(InstanceView(i.id, "m", InstanceState.FULL if i.full else InstanceState.LOADING,
                                      (Stage(i.node, 0, 4),), capacity=4, outstanding_requests=busy))
        queue = left if full else self.in_flight
        model = ModelView("m", SPEC, SIZE, 4, tuple(views), queue_len=queue, in_flight=self.in_flight - queue,
                          last_request_at=self.last_request_at)
        used_gpu = {n: 0 for n in range(4)}
        for i in self.insts.values():
            used_gpu[i.node] += 1
        nodes = []
        for n in range(4):
            hs = tuple(self.holdings[n].values())
            host_used = sum(h.nbytes for h in hs if h.tier is Tier.HOST)
            assert host_used <= HOST, "host memory over-committed"
            assert used_gpu[n] <= 1, "GPU over-booked"
            nodes.append(NodeView(n, 1, 1 - used_gpu[n], HOST, HOST - host_used, holdings=hs))
        return ClusterSnapshot(tuple(nodes), (model,))

    # -- actuator --
    def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None:
        self.plans.append(plan)
        now = self.clock.now()
        for t in plan.targets:
            self.seq += 1
            delay = 0.1 if t.local_tier is Tier.HOST else 0.3
            self.insts[f"i{self.seq}"] = Inst(f"i{self.seq}", t.node, now + delay, timeline)
        timeline.mark_first_chunk(now + 0.05)

    def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None:
        for iid in instance_ids:
            inst = self.insts.pop(iid)
            self.holdings[inst.node].pop(Tier.GPU, None)

    def apply_memory(self, plan: MemoryPlan) -> None:
        for e in plan.evictions:
            self.holdings[e.node].pop(e.tier)
        for c in plan.copy_backs:
            self.holdings[c.node][c.to_tier] = Holding(c.model, c.to_tier, c.nbytes, last_used=self.clock.now())
            self.copies.append((c.node, self.clock.now()))


def test_burst_idle_zero_burst() -> None:
    clock = ManualClock()
    cluster = FakeCluster(clock)
    ctl = Controller(cluster.snapshot, cluster, ControlSettings(scale_down_cooldown_s=5.0), clock)

    def run_until(t: float, in_flight: int) -> list[int]:
        counts = []
        while clock.now() < t - 1e-9:
            cluster.in_flight = in_flight
            if in_flight:
                cluster.last_request_at = clock.now()
            res = ctl.step()
            assert res.errors == ()
            assert len(cluster.insts) <= SPEC.max_instances
            counts.append(len(cluster.insts))
            clock.advance(0.5)
        return counts

    # Burst of 12 concurrent requests: 3 instances at once (12 / target 4), one from node 0's host copy.
    counts = run_until(10.0, 12)
    first = cluster.plans[0]
    assert len(first.targets) == 3 and counts[0] == 3 and set(counts) == {3}
    assert [(t.node, t.local_tier) for t in first.local_targets] == [(0, Tier.HOST)]
    assert [s.node for s in first.sources] == [0] and len(first.network_targets) == 2
    tl = ctl.timelines[0]
    assert tl.complete and tl.all_full_at == 0.3
    # Background copy-back to host on the two nodes that received over the network.
    assert sorted(n for n, _ in cluster.copies) == sorted(first.network_targets)

    # Load stops at t=10: idle instances go at once (cooldown passed); one is kept through keep-alive.
    counts = run_until(40.0, 0)
    last_request = 9.5
    assert counts[0] == 1  # cooldown (5 s after the scale-out at t=0) long passed: straight to one, kept alive
    zero_at = 10.0 + 0.5 * counts.index(0)
    assert last_request + SPEC.keep_alive_s <= zero_at < last_request + SPEC.keep_alive_s + 0.5  # first tick past it

    # The next burst starts every instance from a local host copy: no network transfer at all.
    run_until(42.0, 12)
    second = cluster.plans[-1]
    assert len(second.targets) == 3 and second.network_targets == () and second.sources == ()
    assert all(t.local_tier is Tier.HOST for t in second.targets)
