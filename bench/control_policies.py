"""How long the control policies take per call, for cluster sizes the simulator and gateway see.

The simulator calls the autoscaler, placement and memory manager every control tick (default
0.5 s of simulated time) and the router on every arrival, so these costs bound how fast an
hour-long trace can be simulated. Prints one table; run with ``python bench/control_policies.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from lambdascale.control import (
    ClusterSnapshot,
    ControlSettings,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    ModelView,
    NodeView,
    Stage,
    Tier,
    autoscale,
    manage_memory,
    place_all,
    route_model,
)

GB = 1 << 30


def build(n_nodes: int, n_models: int, gpus: int = 8) -> ClusterSnapshot:
    """A cluster where every model runs on a quarter of the nodes, is cached on half, and is busy."""
    models = []
    holdings: dict[int, list[Holding]] = {i: [] for i in range(n_nodes)}
    used = {i: 0 for i in range(n_nodes)}
    for k in range(n_models):
        name = f"m{k}"
        insts = []
        for j in range(max(1, n_nodes // 4)):
            nid = (k * 7 + j) % n_nodes
            if used[nid] >= gpus:
                continue
            used[nid] += 1
            insts.append(InstanceView(f"{name}-{j}", name, InstanceState.FULL, (Stage(nid, 0, 8),), capacity=8,
                                      outstanding_requests=j % 9, outstanding_tokens=100 * j))
            if all(h.model != name or h.tier is not Tier.GPU for h in holdings[nid]):
                holdings[nid].append(Holding(name, Tier.GPU, 14 * GB, last_used=50.0))
        for j in range(n_nodes // 2):
            nid = (k * 3 + j) % n_nodes
            if all(h.model != name or h.tier is not Tier.HOST for h in holdings[nid]):
                holdings[nid].append(Holding(name, Tier.HOST, 14 * GB, last_used=float(j)))
        spec = DeploymentSpec(max_instances=n_nodes, target_concurrency=4, cache_tiers=(Tier.HOST,))
        models.append(ModelView(name, spec, 14 * GB, 8, tuple(insts), queue_len=40, in_flight=sum(i.outstanding_requests for i in insts),
                                arrival_rate=30.0, service_time_s=2.0, last_request_at=99.0, last_scale_at=90.0))
    nodes = []
    for i in range(n_nodes):
        host_used = sum(h.nbytes for h in holdings[i] if h.tier is Tier.HOST)
        total = max(1024 * GB, host_used)
        nodes.append(NodeView(i, gpus, gpus - used[i], total, total - host_used, holdings=tuple(holdings[i])))
    return ClusterSnapshot(tuple(nodes), tuple(models))


def timeit(fn: Callable[[], object], min_s: float = 0.2) -> float:
    """Mean seconds per call over at least ``min_s`` of calls."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_s:
            return el / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller clusters only")
    args = ap.parse_args()
    cfg = ControlSettings()
    sizes = [(16, 1), (64, 4)] if args.quick else [(16, 1), (64, 4), (256, 8), (1024, 8)]
    print(f"{'nodes':>6} {'models':>6} {'instances':>9} | {'snapshot ms':>11} {'autoscale ms':>12} "
          f"{'place_all ms':>12} {'memory ms':>10} {'tick ms':>8} | {'route us':>9}")
    for n_nodes, n_models in sizes:
        snap_build = timeit(lambda: build(n_nodes, n_models))
        snap = build(n_nodes, n_models)
        n_inst = sum(len(m.instances) for m in snap.models)
        t_auto = timeit(lambda: autoscale(snap, cfg, 100.0))
        decisions = autoscale(snap, cfg, 100.0)
        t_place = timeit(lambda: place_all(snap, decisions, cfg, 100.0))
        t_mem = timeit(lambda: manage_memory(snap, cfg, 100.0))
        m0 = snap.models[0]
        t_route = timeit(lambda: route_model(m0, cfg, 100.0))
        tick = t_auto + t_place + t_mem
        print(f"{n_nodes:>6} {n_models:>6} {n_inst:>9} | {snap_build * 1e3:>11.2f} {t_auto * 1e3:>12.3f} "
              f"{t_place * 1e3:>12.2f} {t_mem * 1e3:>10.2f} {tick * 1e3:>8.2f} | {t_route * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
