"""Execute-while-load on agents: pipelines across nodes give exactly a single-node run's tokens,
also when requests move to a full instance mid-stream (dissolution), and during a multicast."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import TokenState
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import HoldModel
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement, check_placements
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async

REQS = {
    "greedy": TokenState((1, 5, 9, 13, 17), (), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0),
    "hot": TokenState((1, 7, 7, 7), (), SamplingParams(max_tokens=8, temperature=1.3, top_k=40, ignore_eos=True), 1234),
    "nucleus": TokenState(tuple(range(3, 30)), (), SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, ignore_eos=True), 99),
}


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    """Each request alone on an in-process single-node engine."""
    eng = Engine.from_checkpoint(tiny_model)
    out = {}
    for rid, st in REQS.items():
        r = eng.resume(st, request_id=rid)
        toks = []
        for o in eng.stream(r):
            toks.extend(o.token_ids)
        out[rid] = toks
    return out


def eos(model_dir: Path) -> frozenset[int]:
    e = read_manifest(model_dir).arch.eos_token_id
    return frozenset([e] if isinstance(e, int) else (e or []))


def test_placements_must_tile_blocks_without_adjacent_repeats() -> None:
    check_placements([StagePlacement(0, (0, 3)), StagePlacement(1, (3, 8))], 8)
    with pytest.raises(ValueError, match="expected to start at block 3"):
        check_placements([StagePlacement(0, (0, 3)), StagePlacement(1, (4, 8))], 8)
    with pytest.raises(ValueError, match=r"cover blocks \[0, 6\), the model has 8"):
        check_placements([StagePlacement(0, (0, 6))], 8)
    with pytest.raises(ValueError, match="adjacent stages on one node"):
        check_placements([StagePlacement(0, (0, 4)), StagePlacement(0, (4, 8))], 8)
    # non-adjacent stages on one node are fine (the planner does this with several sources)
    check_placements([StagePlacement(0, (0, 2)), StagePlacement(1, (2, 5)), StagePlacement(0, (5, 8))], 8)


#: node 0 runs two non-adjacent stages, as the planner may ask with several sources
FOUR_STAGES = [StagePlacement(0, (0, 3)), StagePlacement(1, (3, 5)), StagePlacement(0, (5, 6)), StagePlacement(2, (6, 8))]


async def _hold(lc: LocalCluster, model_dir: Path, nodes: range) -> None:
    for n in nodes:
        await lc.cluster.request(n, HoldModel(req=0, model_dir=str(model_dir)))


def _serve(pipe: RemotePipeline, model_dir: Path, streamed: dict[str, list[int]]) -> PipelineServer:
    """A server on ``pipe`` holding every request of REQS, streaming into ``streamed``."""
    srv = PipelineServer(pipe, eos(model_dir), on_token=lambda r, t: streamed[r].append(t))
    for rid, st in REQS.items():
        srv.add(rid, st)
    return srv


@pytest.mark.parametrize("microbatches", [1, 0], ids=["one-step-at-a-time", "micro-batches"])
def test_four_stage_pipeline_then_dissolve_to_full_instance(tiny_model: Path, reference, microbatches: int) -> None:
    """Requests move from a pipeline to a full instance mid-stream, no token lost, repeated or
    changed. With micro-batches (one step in flight per stage) the hidden states of different
    steps use their own buffer slots: a mix-up would change the tokens."""
    from lambdascale.runtime.cluster import AgentRequestError
    from lambdascale.runtime.messages import StageStep

    async def main() -> None:
        async with LocalCluster(4, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            await _hold(lc, tiny_model, range(4))
            pipe = RemotePipeline(lc.cluster, manifest, FOUR_STAGES, microbatches=microbatches)
            await pipe.form()
            if microbatches == 0:
                assert pipe.slots == 4
                with pytest.raises(AgentRequestError, match="step 0 uses slot 4; the stage has 4"):
                    await lc.cluster.request(0, StageStep(req=0, pipeline=pipe.name, index=0, step=0, seqs=[], slot=4))
            streamed: dict[str, list[int]] = {r: [] for r in REQS}
            srv = _serve(pipe, tiny_model, streamed)
            await srv.run(max_steps=3)
            if microbatches == 1:  # prefill + 2 decodes, all requests in each step
                assert all(len(v) == 3 for v in streamed.values())
            else:  # one request per micro-batch, all three in flight at once
                assert srv.max_in_flight == len(REQS)
                assert any(streamed.values()) and not all(len(v) == len(reference[r]) for r, v in streamed.items())
            moved = srv.take()  # dissolve: token state moves, KV is recomputed on the full instance
            await pipe.dissolve()
            full = RemotePipeline(lc.cluster, manifest, [StagePlacement(3, (0, 8))])
            await full.form()
            srv2 = PipelineServer(full, eos(tiny_model), on_token=lambda r, t: streamed[r].append(t))
            for rid, st in moved.items():
                srv2.add(rid, st)
            await srv2.run()
            assert streamed == reference
            assert srv2.finished == reference

    run_async(main(), timeout=120)


def test_prompts_longer_than_the_step_budget_prefill_in_chunks(tiny_model: Path) -> None:
    """A 50-token prompt through a pipeline whose steps hold 16 tokens (default numerics): it
    prefills in chunks beside another request's decodes, instead of being refused."""
    from lambdascale.engine.settings import EngineSettings

    reqs = {"long": TokenState(tuple(range(3, 53)), (), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), 0),
            "short": TokenState((1, 5, 9), (), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), 1)}
    eng = Engine.from_checkpoint(tiny_model, EngineSettings(max_num_batched_tokens=16))
    want = {rid: [t for o in eng.stream(eng.resume(st, request_id=rid)) for t in o.token_ids] for rid, st in reqs.items()}

    async def main() -> tuple[dict[str, list[int]], list]:
        async with LocalCluster(2, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            await _hold(lc, tiny_model, range(2))
            pipe = RemotePipeline(lc.cluster, read_manifest(tiny_model), [StagePlacement(0, (0, 4)), StagePlacement(1, (4, 8))],
                                  max_step_tokens=16)
            await pipe.form()
            steps: list = []
            step = pipe.step

            async def spy(seqs, *a, **kw):  # type: ignore[no-untyped-def]
                steps.append([(sid, n) for sid, _, n in seqs])
                return await step(seqs, *a, **kw)

            pipe.step = spy  # type: ignore[method-assign]
            srv = PipelineServer(pipe, eos(tiny_model))
            srv.add("short", reqs["short"])
            await srv.run(max_steps=1)  # "short" is decoding when "long" arrives
            srv.add("long", reqs["long"])
            await srv.run()
            return srv.finished, steps

    got, steps = run_async(main(), timeout=120)
    assert got == want
    long_chunks = [n for st in steps for sid, n in st if sid == "long"]
    assert long_chunks[:4] == [15, 15, 15, 5] and all(sum(n for _, n in st) <= 16 for st in steps)


def test_a_node_runs_one_step_at_a_time_across_its_stages(tiny_model: Path, reference) -> None:
    """Node 0 hosts stages 0 and 2 of a pipeline with three micro-batches in flight, under an
    emulated device whose steps last long enough to overlap: its device steps never overlap
    (one accelerator per node), and the tokens are still the single-node run's."""
    from lambdascale.runtime.messages import GetStatus

    async def main() -> None:
        async with LocalCluster(2, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            await _hold(lc, tiny_model, range(2))
            pipe = RemotePipeline(lc.cluster, read_manifest(tiny_model), [StagePlacement(0, (0, 3)),
                                  StagePlacement(1, (3, 5)), StagePlacement(0, (5, 8))],
                                  microbatches=0, emulate_device="h200:llama2-7b:20")
            await pipe.form()
            streamed: dict[str, list[int]] = {r: [] for r in REQS}
            srv = _serve(pipe, tiny_model, streamed)
            await srv.run()
            assert streamed == reference and srv.max_in_flight == 3
            steps = sorted((a, b, i) for a, b, p, i in (await lc.cluster.request(0, GetStatus(req=0)))["device_steps"]
                           if p == pipe.name)
            assert {i for _, _, i in steps} == {0, 2}
            assert all(b1 <= a2 for (_, b1, _), (a2, _, _) in zip(steps, steps[1:])), "two device steps overlapped"

    run_async(main(), timeout=120)


def test_stage_needs_its_blocks(tiny_model: Path) -> None:
    from lambdascale.runtime.cluster import AgentRequestError
    from lambdascale.runtime.multicast import prepare_receivers

    async def main() -> None:
        async with LocalCluster(2, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            await prepare_receivers(lc.cluster, manifest, [1])  # buffers, but no chunk held
            pipe = RemotePipeline(lc.cluster, manifest, [StagePlacement(1, (0, 8))])
            with pytest.raises(AgentRequestError, match=r"node 1 cannot form a stage of blocks \[0, 8\): chunks \[0, 1,"):
                await pipe.form()

    run_async(main())


def test_pipeline_batch_follows_the_members_kv_memory(tiny_model: Path) -> None:
    from lambdascale.engine.scheduler import prefill_chunk_size
    from lambdascale.runtime.pipeline import pipeline_batch

    m = read_manifest(tiny_model)
    layers = [b.layers for b in m.blocks]
    total = m.arch.num_hidden_layers
    B = m.n_blocks
    assert B >= 3, "the test needs a model of at least three blocks"
    whole = [StagePlacement(0, (0, B))]
    assert pipeline_batch(whole, m, 8, 512) == (8, 512)  # a full instance is unchanged
    half = B // 2
    two = [StagePlacement(1, (0, half)), StagePlacement(2, (half, B))]
    widest = max(layers[half - 1][1] - layers[0][0], layers[B - 1][1] - layers[half][0])
    seqs, step = pipeline_batch(two, m, 8, 512)
    assert seqs == 8 * total // widest and seqs > 8  # the widest stage decides
    # the step budget grows with the batch so batch-invariant prefill chunks stay the same
    assert prefill_chunk_size(step, seqs) == prefill_chunk_size(512, 8)
    assert pipeline_batch(two, m, 8, 512, "instance") == (8, 512)
    three = [StagePlacement(1, (0, 1)), StagePlacement(2, (1, 2)), StagePlacement(3, (2, B))]
    widest3 = max(hi - lo for lo, hi in [(layers[0][0], layers[0][1]), (layers[1][0], layers[1][1]),
                                          (layers[2][0], layers[B - 1][1])])
    assert pipeline_batch(three, m, 8, 512)[0] == 8 * total // widest3
    with pytest.raises(ValueError, match="'kv' or 'instance'"):
        pipeline_batch(two, m, 8, 512, "memory")
