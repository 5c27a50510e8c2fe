"""Simulator smoke tests with a constant cost model, determinism, isolation, and the multicast
against the planners' player."""

from __future__ import annotations

import numpy as np
import pytest

from lambdascale.control.decisions import ScalePlan, Source, Target
from lambdascale.control.settings import ControlSettings, MulticastAlgo
from lambdascale.control.spec import Tier
from lambdascale.pipe.multicast import plan_multicast
from lambdascale.pipe.player import Links, play
from lambdascale.sim.cluster import load_cluster, resolve_model
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.systems import SYSTEMS, SystemKind, get_systems
from lambdascale.sim.workload import Generator, SyntheticSpec, Workload, synthetic

PREFILL, DECODE = 1e-3, 2e-4  # seconds per layer, whatever the tokens or batch


def _const(model_layers: int) -> CostModel:
    return CostModel.constant(model_layers, PREFILL, DECODE)


def _sim(w: Workload, system: str = "lambdascale", **kw: object) -> Simulation:
    cluster = load_cluster("h800-ib400")
    model = resolve_model("llama2-7b")
    settings = SimSettings(**{"nodes": 4, "min_instances": 1, **kw})  # type: ignore[arg-type]
    return Simulation(w, cluster, model, SYSTEMS[SystemKind(system)], settings, ControlSettings(), _const(32))


def test_constant_cost_single_requests_give_exact_ttft_and_tpot() -> None:
    # Requests far apart: each runs alone on the warm instance.
    n = 5
    w = Workload("spaced", np.arange(n) * 100.0, np.full(n, 64), np.full(n, 11))
    r = _sim(w).run()
    assert r.unfinished == 0
    assert np.allclose(r.ttft, 32 * PREFILL)          # one prefill step over 32 layers
    assert np.allclose(r.tpot, 32 * DECODE)           # then 10 decode steps of 32 layers
    assert not r.scale_events                          # one request at a time never scales out
    # GPU-seconds: the one warm instance, held from 0 to the end of the run.
    assert r.gpu_seconds == pytest.approx(r.end_time)


def test_batching_joins_at_step_boundary() -> None:
    # Second request arrives mid-decode of the first: it is prefilled at the next step boundary.
    w = Workload("pair", np.array([0.0, 0.0405]), np.array([10, 10]), np.array([100, 2]))
    r = _sim(w).run()
    step = 32 * DECODE
    t1 = 32 * PREFILL
    boundary = t1 + np.ceil((0.0405 - t1) / step) * step
    # its prefill step also decodes the running sequence (prefill + decode of one)
    assert r.ttft[1] == pytest.approx(boundary + 32 * PREFILL + 32 * DECODE - 0.0405)
    # the first request lost no tokens: it finishes after 99 more tokens, one step slower
    assert r.finish[0] == pytest.approx(t1 + 99 * step + 32 * PREFILL)


def test_burst_scales_out_and_every_request_finishes() -> None:
    w = synthetic(SyntheticSpec(generator=Generator.POISSON, rate=40.0, duration_s=20.0,
                                input_tokens=256, output_tokens=64), seed=3)
    for name in ("lambdascale", "serverlessllm", "faasnet", "nccl", "keepalive"):
        r = _sim(w, name, target_concurrency=2).run()
        assert r.unfinished == 0, name
        assert r.scale_events, name
        assert np.all(r.ttft >= 32 * PREFILL - 1e-12), name
        assert r.gpu_seconds > r.end_time  # more than the one warm instance was held


def test_same_inputs_same_results_and_simulations_do_not_interfere() -> None:
    w = synthetic(SyntheticSpec(generator=Generator.GAMMA, rate=20.0, cv=3.0, duration_s=30.0,
                                input_tokens=512, output_tokens=32), seed=5)
    a = _sim(w, target_concurrency=2)
    b = _sim(w, "faasnet", target_concurrency=2)
    # Interleave: build both, run b first; then a fresh copy of a must match.
    rb = b.run()
    ra = a.run()
    ra2 = _sim(w, target_concurrency=2).run()
    assert np.array_equal(ra.ttft, ra2.ttft) and ra.gpu_seconds == ra2.gpu_seconds
    assert [e.timeline.to_dict() for e in ra.scale_events] == [e.timeline.to_dict() for e in ra2.scale_events]
    assert rb.system == "faasnet"


@pytest.mark.parametrize("mode", ["round", "chunk"])
@pytest.mark.parametrize("algo,n,sources", [("binomial", 8, 1), ("binomial", 8, 3), ("binomial", 11, 2),
                                            ("faasnet", 7, 1), ("ring", 6, 1), ("direct", 5, 1)])
def test_uncontended_multicast_matches_player(algo: str, n: int, sources: int, mode: str) -> None:
    sim = _sim(Workload("none", np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)),
               nodes=n, min_instances=sources, multicast_mode=mode)
    sim._start()
    plan = ScalePlan(model=sim.model.name, targets=tuple(Target(v, Tier.NONE) for v in range(sources, n)),
                     sources=tuple(Source(v, Tier.GPU) for v in range(sources)), algo=MulticastAlgo(algo))
    rec = sim._execute(plan)
    sim.loop.run()
    mc = plan_multicast(algo, n, sources, sim.model.n_blocks, sim.model.n_chunks)
    links = Links(nic_send_bps=sim.nic_Bps, nic_recv_bps=sim.nic_Bps, latency_s=sim.nic_latency)
    ref = play(mc, sim.model.chunk_bytes, links, mode=mode)
    start = sim._transfer_start_s(plan, sim.model.tp)  # the ring's collective start-up (links.nccl_init_per_rank_s)
    assert (start > 0) == (algo == "ring")
    for v in range(sources, n):
        assert rec.timeline.node_full_at[v] == pytest.approx(start + ref.node_full[v], rel=1e-9, abs=1e-12)
    assert rec.timeline.all_full_at == pytest.approx(start + ref.completion_time, rel=1e-9)


def test_unknown_system_is_named() -> None:
    with pytest.raises(Exception, match="unknown system 'vllm'"):
        get_systems("lambdascale,vllm")
