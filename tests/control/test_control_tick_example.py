"""The consumer's view: how a simulator (or the gateway) builds a snapshot and runs all four policies in one tick.

This doubles as documentation: a burst hits a model held in host memory on one node of a
four-node cluster; one tick decides the scale-out, places it (multi-source when possible), plans
memory, and routes the burst (held while instances start). The next tick, with the receivers
serving as a λPipe pipeline, routes to it.
"""

from __future__ import annotations

from lambdascale.control import (
    ClusterSnapshot,
    ControlSettings,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    ModelView,
    NodeView,
    RouteKind,
    Stage,
    Tier,
    autoscale,
    manage_memory,
    place_all,
    route_many,
)

GB = 1 << 30


def test_one_tick_as_a_simulator_runs_it() -> None:
    cfg = ControlSettings()  # the simulator takes cfg.control from its LambdaScaleConfig
    spec = DeploymentSpec(min_instances=0, max_instances=4, target_concurrency=2, keep_alive_s=30.0)
    size = 13 * GB
    nodes = tuple(
        NodeView(
            id=i,
            gpus_total=1,
            gpus_free=1,
            host_bytes_total=64 * GB,
            host_bytes_free=64 * GB - (size if i == 0 else 0),
            holdings=(Holding("llama2-13b", Tier.HOST, size, last_used=0.0),) if i == 0 else (),
        )
        for i in range(4)
    )
    now = 100.0
    m = ModelView("llama2-13b", spec, size_bytes=size, n_blocks=8, queue_len=0, last_request_at=now)
    snap = ClusterSnapshot(nodes=nodes, models=(m,))

    # Route the burst of 7 requests first (the simulator's arrival events): all held, none lost.
    routed = route_many(m, 7, cfg, now)
    assert all(d.kind is RouteKind.HOLD for d in routed)
    # The next tick sees those 7 queued requests.
    snap = ClusterSnapshot(nodes=nodes, models=(ModelView("llama2-13b", spec, size, 8, queue_len=7, last_request_at=now),))

    decisions = autoscale(snap, cfg, now)
    assert decisions[0].add == 4  # ceil(7 / 2), capped at max_instances=4
    (plan,) = place_all(snap, decisions, cfg, now)
    assert plan.local_targets[0].node == 0 and plan.local_targets[0].local_tier is Tier.HOST
    assert plan.network_targets == (1, 2, 3) and [s.node for s in plan.sources] == [0]
    assert plan.multicast_nodes() == (0, 1, 2, 3)  # -> plan_multicast("binomial", 4, 1, n_blocks, n_chunks)
    assert plan.execute_while_load
    assert manage_memory(snap, cfg, now).is_noop  # nothing to evict or copy back yet

    # A moment later: nodes 1-3 loading, and together they run a 3-stage pipeline; node 0 loaded.
    loading = tuple(
        InstanceView(f"l{i}", "llama2-13b", InstanceState.LOADING, (Stage(i, 0, 8),), capacity=4) for i in (1, 2, 3)
    )
    pipe = InstanceView(
        "p0", "llama2-13b", InstanceState.PIPELINED, (Stage(1, 0, 3), Stage(2, 3, 6), Stage(3, 6, 8)), capacity=3
    )
    full0 = InstanceView("f0", "llama2-13b", InstanceState.FULL, (Stage(0, 0, 8),), capacity=4, outstanding_requests=4)
    later = ModelView("llama2-13b", spec, size, 8, instances=loading + (pipe, full0), in_flight=4, queue_len=3,
                      last_request_at=now, last_scale_at=now)
    (d,) = autoscale(ClusterSnapshot(nodes=nodes, models=(later,)), cfg, now + 0.5)
    assert d.is_noop  # 4 counted instances already cover the load; pipelines are not double-counted
    held = route_many(later, 3, cfg, now + 0.5)
    assert [x.instance_id for x in held] == ["p0", "p0", "p0"]  # the pipeline serves while loading
