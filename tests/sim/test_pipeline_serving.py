"""How the simulator serves on λPipe pipelines and instances: micro-batches through the stages,
the pipeline's batch, a burst arriving at one instant, and sources lending their devices."""

from __future__ import annotations

import numpy as np
import pytest

from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import InstanceState
from lambdascale.pipe.pipeline_types import Pipeline
from lambdascale.sim.cluster import load_cluster, resolve_model
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.state import Inst, Req
from lambdascale.sim.systems import SYSTEMS, SystemKind
from lambdascale.sim.workload import Workload

LAYERS = 32
PREFILL_PER_TOKEN = 1e-5  # seconds per layer and prompt token: prefill cost grows with its tokens
DECODE = 2e-4  # seconds per layer, whatever the batch


def _linear() -> CostModel:
    # points (1, 1e-5) and (1000, 1e-2): per-layer prefill time = tokens x 1e-5
    return CostModel(((1.0, 1000.0), (PREFILL_PER_TOKEN, 1000 * PREFILL_PER_TOKEN)), ((1.0,), (DECODE,)), LAYERS)


def _sim(w: Workload | None = None, **kw: object) -> Simulation:
    w = w or Workload("none", np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    settings = SimSettings(**{"nodes": 6, "min_instances": 0, "max_batch": 8, **kw})  # type: ignore[arg-type]
    return Simulation(w, load_cluster("h200-ib400"), resolve_model("llama2-7b"), SYSTEMS[SystemKind.LAMBDASCALE],
                      settings, ControlSettings(), _linear())


def _pipeline(sim: Simulation, assignment: tuple[int, ...]) -> Inst:
    p = Pipeline(assignment)
    stages = tuple((s.node, s.start, s.end) for s in p.stages)
    return sim._new_inst(sim.models[0], InstanceState.PIPELINED, stages, pipeline=p)


def _burst_on(sim: Simulation, inst: Inst, n: int, inp: int, out: int) -> list[Req]:
    reqs = [Req(i, 0.0, inp, out) for i in range(n)]
    for r in reqs:
        inst.pending.append(r)
    sim._start_step(inst)
    sim.loop.run()
    return reqs


def test_a_pipeline_pass_runs_one_microbatch_per_stage_through_the_stages() -> None:
    sim = _sim()
    inst = _pipeline(sim, (2, 2, 3, 3, 4, 4, 5, 5))  # four stages of two blocks
    assert inst.slots == 4 and inst.bottleneck_share == pytest.approx(0.25)
    n, inp = 32, 100
    reqs = _burst_on(sim, inst, n, inp, 1)
    # each micro-batch prefills 8 prompts through all 32 layers, plus three hops of hidden states
    c = LAYERS * PREFILL_PER_TOKEN * 8 * inp
    lat = c + sim._comm(inst, 8 * inp)
    firsts = sorted({round(r.first_token, 12) for r in reqs})
    # micro-batch j enters once j others have cleared the busiest node: its first tokens come j x (lat / 4) later
    assert firsts == pytest.approx([lat + j * 0.25 * lat for j in range(4)])
    assert [sum(r.first_token == pytest.approx(f) for r in reqs) for f in firsts] == [8, 8, 8, 8]
    # one step in flight at a time: the whole burst leaves the last stage together, 4 x later
    one = _sim(pipeline_microbatches=1)
    inst1 = _pipeline(one, (2, 2, 3, 3, 4, 4, 5, 5))
    assert inst1.slots == 1
    reqs1 = _burst_on(one, inst1, n, inp, 1)
    whole = LAYERS * PREFILL_PER_TOKEN * n * inp + one._comm(inst1, n * inp)
    assert all(r.first_token == pytest.approx(whole) for r in reqs1)
    assert max(firsts) < 0.5 * whole


def test_decode_passes_follow_each_other_at_the_pipelines_pace() -> None:
    sim = _sim()
    inst = _pipeline(sim, (2, 2, 3, 3, 4, 4, 5, 5))
    reqs = _burst_on(sim, inst, 8, 10, 6)
    lat_prefill = LAYERS * PREFILL_PER_TOKEN * 2 * 10 + sim._comm(inst, 20)
    fill = lat_prefill + 3 * 0.25 * lat_prefill
    # five decode passes: every micro-batch of 2 decodes through 32 layers and 3 hops; flat decode
    # cost makes each pass as long as one micro-batch's latency (stages never wait for each other)
    lat_decode = LAYERS * DECODE + sim._comm(inst, 2)
    assert all(r.finish == pytest.approx(fill + 5 * lat_decode) for r in reqs)
    assert all(r.generated == r.out == 6 for r in reqs)


def test_a_pipeline_takes_what_its_widest_stage_keeps_in_kv_memory() -> None:
    sim = _sim()
    assert _pipeline(sim, (2, 2, 3, 3, 4, 4, 5, 5)).capacity == 8 * 8 // 2
    assert _pipeline(sim, (2, 2, 2, 3, 3, 3, 4, 4)).capacity == 8 * 8 // 3
    assert _pipeline(sim, (2, 3, 2, 3, 2, 3, 2, 3)).bottleneck_share == pytest.approx(0.5)  # a node's blocks add up
    assert _pipeline(_sim(pipeline_batch="instance"), (2, 2, 3, 3, 4, 4, 5, 5)).capacity == 8
    whole = sim._new_inst(sim.models[0], InstanceState.FULL, ((0, 0, 8),))
    assert whole.capacity == 8 and whole.slots == 1 and whole.bottleneck_share == 1.0


def test_requests_arriving_at_one_instant_start_as_one_batch() -> None:
    n, inp = 6, 50
    w = Workload("burst", np.full(n, 1.0), np.full(n, inp), np.full(n, 3))
    sim = _sim(w, min_instances=1)
    res = sim.run()
    # one prefill step of all six prompts, not one prompt first and five at the next boundary
    assert res.ttft == pytest.approx(np.full(n, LAYERS * PREFILL_PER_TOKEN * n * inp))
    assert np.all(res.finish == res.finish[0])


def test_a_lending_source_finishes_its_running_segment_later_by_what_it_lent() -> None:
    sim = _sim(pipeline_helper_blocks=4)
    src = sim.nodes[0]
    sim._warm(src, sim.models[0])
    own = [Req(i, 0.0, 10, 5) for i in range(2)]
    src.insts["llama2-7b"].pending.extend(own)
    sim._start_step(src.insts["llama2-7b"])
    sim.loop.run(until=LAYERS * PREFILL_PER_TOKEN * 20 + 1e-9)  # its prefill pass is over, 4 decode passes run
    alone = sim.loop.now() + 4 * LAYERS * DECODE
    assert src.insts["llama2-7b"].seg_end(src.insts["llama2-7b"].seg_k) == pytest.approx(alone)
    pipe = _pipeline(sim, (1, 1, 1, 1, 0, 0, 0, 0))  # the source runs the second half
    pipe.helper_share = {0: 0.5}
    guest = [Req(10 + i, sim.loop.now(), 100, 1) for i in range(2)]
    pipe.pending.extend(guest)
    sim._start_step(pipe)
    lent = 0.5 * 2 * LAYERS * PREFILL_PER_TOKEN * 100  # half the blocks of two micro-batches' prefill
    sim.loop.run()
    assert all(r.finish == pytest.approx(alone + lent) for r in own)
    assert all(r.generated == r.out for r in own + guest)


def test_a_dissolved_pipeline_gives_back_the_time_charged_for_passes_it_never_ran() -> None:
    sim = _sim(pipeline_helper_blocks=4)
    src = sim.nodes[0]
    sim._warm(src, sim.models[0])
    src.insts["llama2-7b"].pending.extend(Req(i, 0.0, 10, 40) for i in range(2))
    sim._start_step(src.insts["llama2-7b"])
    prefill_end = LAYERS * PREFILL_PER_TOKEN * 20
    sim.loop.run(until=prefill_end + 1e-9)
    alone = src.insts["llama2-7b"].seg_end(src.insts["llama2-7b"].seg_k)
    assert alone == pytest.approx(prefill_end + 39 * LAYERS * DECODE)
    pipe = _pipeline(sim, (1, 1, 1, 1, 0, 0, 0, 0))
    pipe.helper_share = {0: 0.5}
    pipe.pending.extend(Req(10 + i, sim.loop.now(), 100, 6) for i in range(2))
    sim._start_step(pipe)
    lent_prefill = 0.5 * 2 * LAYERS * PREFILL_PER_TOKEN * 100
    sim.loop.run(until=pipe.seg_end(1) + 1e-9)  # its prefill pass is over: 5 decode passes charged
    per_pass = 0.5 * 2 * LAYERS * DECODE  # half the blocks of two micro-batches' decode step
    assert pipe.seg_k == 5 and pipe.lent_per_pass == {0: pytest.approx(per_pass)}
    assert src.insts["llama2-7b"].seg_end(src.insts["llama2-7b"].seg_k) == pytest.approx(alone + lent_prefill + 5 * per_pass)
    sim.loop.run(until=pipe.seg_start + pipe.seg_fill + 0.5 * pipe.seg_period)  # mid second pass
    sim._dissolve(pipe)
    # one pass ran, the one in flight drains; the other three are given back
    assert src.insts["llama2-7b"].seg_end(src.insts["llama2-7b"].seg_k) == pytest.approx(alone + lent_prefill + 2 * per_pass)
    assert all(r.generated == 2 and r.resume for r in sim.models[0].held)


def _dissolving_pipeline(**kw: object) -> tuple[Simulation, Inst, Inst, list[Req]]:
    """Four requests decoding on a 4-stage pipeline over nodes 2-5, and node 2's new full instance."""
    sim = _sim(**kw)
    pipe = _pipeline(sim, (2, 2, 3, 3, 4, 4, 5, 5))
    reqs = [Req(i, 0.0, 100, 10) for i in range(4)]
    pipe.pending.extend(reqs)
    sim._start_step(pipe)
    sim.loop.run(until=pipe.seg_end(1) + 1e-9)  # prefilled: each has its first token
    dest = sim._new_inst(sim.models[0], InstanceState.FULL, ((2, 0, 8),))
    return sim, pipe, dest, reqs


def test_a_dissolving_pipeline_ships_its_requests_kv_to_a_full_instance() -> None:
    sim, pipe, dest, reqs = _dissolving_pipeline()
    assert all(r.generated == 1 for r in reqs)
    t0 = sim.loop.now()
    sim._dissolve(pipe)
    assert sim.kv_shipped == 4 and not sim.models[0].held and dest.incoming == 4 and dest.outstanding == 4
    # the stages on nodes 3-5 send their three quarters of each cache into node 2's one NIC
    nbytes = 4 * (100 + 1) * sim.kv_tok * 0.75
    landed = t0 + nbytes / sim.nic_Bps + sim.nic_latency + sim.s.kv_ship_overhead_s
    sim.loop.run()
    # no prefill on arrival: the nine tokens left are nine decode steps of four
    assert all(r.finish == pytest.approx(landed + 9 * LAYERS * DECODE) for r in reqs)
    assert all(r.generated == r.out and r.migrations == 1 for r in reqs) and dest.incoming == 0


def test_recomputing_or_no_free_slot_sends_the_requests_back_to_the_gateway() -> None:
    sim, pipe, dest, reqs = _dissolving_pipeline(kv_move="recompute")
    sim._dissolve(pipe)
    assert sim.kv_shipped == 0 and list(sim.models[0].held) == reqs and all(r.resume for r in reqs)
    sim, pipe, dest, reqs = _dissolving_pipeline()
    dest.capacity = 2  # room for two: the other two recompute wherever the router puts them
    sim._dissolve(pipe)
    assert sim.kv_shipped == 2 and dest.incoming == 2 and len(sim.models[0].held) == 2


def test_a_pass_splits_its_requests_over_microbatches_as_the_runtime_launches_them() -> None:
    sim = _sim()
    inst = _pipeline(sim, (2, 2, 2, 2, 3, 3, 3, 3))  # two stages: two micro-batches
    reqs = _burst_on(sim, inst, 5, 100, 1)
    lat = [LAYERS * PREFILL_PER_TOKEN * n * 100 + sim._comm(inst, n * 100) for n in (3, 2)]
    # 5 over 2 is 3 then 2 (ceil of those left, PipelineServer.plan_step), in admission order
    assert [r.first_token for r in reqs[:3]] == pytest.approx([lat[0]] * 3)
    assert [r.first_token for r in reqs[3:]] == pytest.approx([0.5 * max(lat) + lat[1]] * 2)


def test_running_sequences_fill_the_first_microbatches_and_new_ones_follow() -> None:
    sim = _sim()
    inst = _pipeline(sim, (2, 2, 2, 2, 3, 3, 3, 3))
    running = [Req(i, 0.0, 10, 9, generated=1) for i in range(2)]
    inst.running.extend(running)
    new = [Req(2 + i, 0.0, 100, 1) for i in range(2)]
    inst.pending.extend(new)
    sim._start_step(inst)
    decodes = LAYERS * DECODE + sim._comm(inst, 2)
    prefills = LAYERS * PREFILL_PER_TOKEN * 200 + sim._comm(inst, 200)
    # decodes first (micro-batch 0), then the prefills (micro-batch 1), as plan_step orders them
    assert inst.seg_first == pytest.approx([0.5 * max(decodes, prefills) + prefills] * 2)


def test_a_pipelines_step_budget_grows_by_its_extra_sequences() -> None:
    sim = _sim(max_prefill_tokens=100)
    inst = _pipeline(sim, (2, 2, 2, 2, 3, 3, 3, 3))  # 16 sequences: 8 more than a full instance
    assert inst.step_tokens == 108 and sim._new_inst(sim.models[0], InstanceState.FULL, ((0, 0, 8),)).step_tokens == 100
    inst.pending.extend(Req(i, 0.0, 54, 1) for i in range(5))
    sim._start_step(inst)
    assert len(inst.seg_new) == 4  # 4 x 54 = 216 = 2 steps x 108 (2 x 100 would take 3)


def _pipeline_and_full(**kw: object) -> tuple[Simulation, Inst, Inst]:
    """A pipeline over nodes 2-5 serving 4 requests, node 2's full instance, 10 requests held."""
    sim = _sim(**kw)
    pipe = _pipeline(sim, (2, 2, 3, 3, 4, 4, 5, 5))
    pipe.running.extend(Req(100 + i, 0.0, 10, 50, generated=1) for i in range(4))
    full = sim._new_inst(sim.models[0], InstanceState.FULL, ((2, 0, 8),))
    sim.models[0].held.extend(Req(i, 0.0, 10, 5) for i in range(10))
    return sim, pipe, full


def test_a_receivers_full_instance_keeps_slots_for_the_pipelines_requests() -> None:
    sim, pipe, full = _pipeline_and_full()
    pipe.capacity = 4  # the pipeline takes nothing more: only the full instance can
    sim._pump()
    # ceil(4 requests / 4 receivers) = 1 of its 8 slots stays free for a shipped cache
    assert full.outstanding == 7 and len(sim.models[0].held) == 3
    sim, pipe, full = _pipeline_and_full(kv_move="recompute")
    pipe.capacity = 4
    sim._pump()
    assert full.outstanding == 8 and len(sim.models[0].held) == 2  # recompute: moved requests re-queue, nothing kept


def _scale_out(helper_blocks: int) -> Simulation:
    from lambdascale.control.placement import place_model

    sim = _sim(nodes=2, pipeline_helper_blocks=helper_blocks)
    src = sim.nodes[0]
    sim._warm(src, sim.models[0])
    snap = sim.snapshot()
    sim._execute(place_model(snap, snap.models[0], 1, sim.cfg, 0.0))
    return sim


def test_one_receiver_gets_a_pipeline_planner_only_with_a_lending_source() -> None:
    assert not _scale_out(0)._pipelines  # it can only serve alone once full, as the core plans it
    assert len(_scale_out(2)._pipelines) == 1
