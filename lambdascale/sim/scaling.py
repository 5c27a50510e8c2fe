"""``simulate scaling``: one scale-out alone, per system, on an idle cluster.

``sources`` nodes hold the model in ``tier`` (gpu: a running instance; host: pinned host memory;
ssd: only on disk); the other nodes hold it on SSD only (when ``sim.ssd_preloaded``). The shared
placement policy plans the scale-out to ``nodes`` instances (sources included), the simulator
executes it, and we read when the first pipeline (or first full instance) could serve and when
all nodes serve alone.

With a burst (``Burst``: requests that arrive with the decision, as ``lambdascale bench scale``
fires them) the result also says how the burst was served: TTFT percentiles, when its last
request got its first token and when its last request finished. The sources serve it from the
start when they hold the model on GPU; pipelines and new instances take the rest as they appear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lambdascale.control.placement import place_model
from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import Tier
from lambdascale.sim.cluster import ClusterSpec, SimModel
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.events import Priority
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.systems.base import System
from lambdascale.sim.workload import Workload


@dataclass(frozen=True)
class Burst:
    """``requests`` requests arriving with the scale-out decision, each of ``prompt_tokens``
    prompt tokens and ``max_tokens`` output tokens."""

    requests: int
    prompt_tokens: int = 24
    max_tokens: int = 8

    def __post_init__(self) -> None:
        if self.requests < 0 or self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"a burst needs requests >= 0, prompt_tokens >= 1 and max_tokens >= 1, got {self}")

    def workload(self) -> Workload:
        n = self.requests
        return Workload(f"burst{n}", np.zeros(n), np.full(n, self.prompt_tokens, dtype=np.int64),
                        np.full(n, self.max_tokens, dtype=np.int64))


@dataclass(frozen=True)
class ScalingResult:
    """Seconds from the decision; ``first_serve_s`` is the first pipeline or first full instance.
    The burst figures are NaN without a burst (``burst == 0``)."""

    system: str
    model: str
    nodes: int
    sources: int
    tier: str
    first_serve_s: float
    all_full_s: float
    how: str
    burst: int = 0
    ttft_p50_s: float = float("nan")
    ttft_p99_s: float = float("nan")
    last_first_token_s: float = float("nan")
    last_done_s: float = float("nan")


def simulate_scaling(cluster: ClusterSpec, model: SimModel, system: System, settings: SimSettings,
                     control: ControlSettings, cost: CostModel, nodes: int, sources: int,
                     tier: Tier, burst: Burst | None = None) -> ScalingResult:
    """Time one scale-out of an idle cluster, with a burst of requests arriving with it if given."""
    w = burst.workload() if burst is not None and burst.requests else None
    return scale_once(cluster, model, system, settings, control, cost, nodes, sources, tier, workload=w)[0]


def scale_once(cluster: ClusterSpec, model: SimModel, system: System, settings: SimSettings,
               control: ControlSettings, cost: CostModel, nodes: int, sources: int, tier: Tier,
               workload: Workload | None = None) -> tuple[ScalingResult, Simulation]:
    """One scale-out; requests of ``workload`` (if any) arrive meanwhile and are routed to whatever
    serves (pipelines, then full instances). No autoscaler runs: the scale-out is the only one."""
    if not 1 <= sources < nodes:
        raise ValueError(f"sources must be in [1, nodes-1], got sources={sources} nodes={nodes}")
    w = workload if workload is not None else Workload(
        "none", np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    s = settings.model_copy(update={"nodes": nodes, "min_instances": 0})
    sim = Simulation(w, cluster, model, system, s, control, cost)
    m = sim.models[0]
    for i in range(sources):
        node = sim.nodes[i]
        if tier is Tier.GPU:
            sim._warm(node, m)
        elif tier is Tier.HOST:
            sim._put_host(node, m)
        if m.name not in node.ssd:
            node.ssd.add(m.name)
            node.ssd_used += m.model.nbytes
    snap = sim.snapshot()
    mv = snap.models[0]
    add = nodes - (sources if tier is Tier.GPU else 0)
    plan = place_model(snap, mv, add, sim.cfg, 0.0, gpus_free=sim._gpus_free_for(m))
    rec = sim._execute(plan)
    for r in sim.reqs:
        sim.loop.schedule(r.arrival, Priority.ARRIVAL, sim._arrive, r)
    sim.loop.run()
    tl = rec.timeline
    first = (tl.first_pipeline_at if tl.first_pipeline_at is not None else float("nan")) - tl.decided_at
    full = (tl.all_full_at if tl.all_full_at is not None else float("nan")) - tl.decided_at
    how = f"{rec.algo} from {rec.n_sources} src" if rec.n_network else "local " + "/".join(f"{k}:{v}" for k, v in sorted(rec.tiers.items()))
    if rec.n_network and rec.tiers.get("none", 0) < rec.n_targets:
        how += " + local " + "/".join(f"{k}:{v}" for k, v in sorted(rec.tiers.items()) if k != "none")
    res = ScalingResult(system.name, model.name, nodes, sources, tier.value, first, full, how)
    if sim.reqs:
        ttft = np.array([r.first_token - r.arrival for r in sim.reqs])
        first_at = np.array([r.first_token for r in sim.reqs]) - tl.decided_at
        done_at = np.array([r.finish for r in sim.reqs]) - tl.decided_at
        res = replace(res, burst=len(sim.reqs), ttft_p50_s=float(np.percentile(ttft, 50)),
                      ttft_p99_s=float(np.percentile(ttft, 99)), last_first_token_s=float(np.max(first_at)),
                      last_done_s=float(np.max(done_at)))
    return res, sim
