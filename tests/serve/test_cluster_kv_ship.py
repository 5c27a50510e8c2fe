"""Dissolving a pipeline in the gateway ships its requests' KV to a full instance (runtime.kv_move):
they continue with a decode step there, no token recomputed, and every stream equals a single
engine's; with ``recompute`` they go back through the queue instead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lambdascale.config import load_config
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.pipe.pipelines import Pipeline
from lambdascale.runtime.messages import HoldModel
from lambdascale.serve.backend import GenerationRequest, SamplingSpec
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.metrics import GatewayMetrics
from lambdascale.serve.schemas import DeploySpec

PROMPTS = [(1, 5, 9, 13), (2, 4, 6, 8, 10, 12)]
N_TOKENS = 40


@pytest.mark.parametrize("kv_move, sampled", [("ship", False), ("recompute", False), ("ship", True), ("recompute", True)])
def test_dissolution_ships_kv_to_a_full_instance(tmp_path: Path, kv_move: str, sampled: bool) -> None:
    """Greedy with default numerics; sampled (temperature 0.8, seeded) with engine.batch_invariant,
    where a moved request's tokens must equal a single engine's bitwise whichever way it moved."""
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.engine.settings import EngineSettings
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
    name = ck.dir.name
    temp = 0.8 if sampled else 0.0
    eng = Engine.from_checkpoint(ck.dir, EngineSettings(batch_invariant=sampled, max_batch_size=2))
    want = [[t for o in eng.generate(list(p), SamplingParams(max_tokens=N_TOKENS, temperature=temp, seed=7 + i,
                                                             ignore_eos=True))
             for t in o.token_ids] for i, p in enumerate(PROMPTS)]
    cfg = load_config(None, {"runtime.nodes": 3, "engine.max_batch_size": 2, "engine.max_model_len": 128,
                             "runtime.kv_move": kv_move, "engine.batch_invariant": sampled})

    async def main() -> tuple[list[list[int]], ClusterBackend]:
        backend = ClusterBackend(cfg, tmp_path, autoscale=False)
        await backend.start()
        try:
            await backend.deploy(DeploySpec(name=name, min_instances=1))  # a full instance on node 0
            m = backend.core.deployments[name]
            (first,) = m.units
            first.draining = True  # leaves once idle: the requests below can only go to the pipeline
            m.wakeup.set()
            while first in m.units:
                await asyncio.sleep(0.01)
            for n in (1, 2):
                await backend.cluster.request(n, HoldModel(req=0, model_dir=str(ck.dir)))
            tl = ScaleTimeline(event_id=0, model=name, decided_at=backend.clock.now())
            pipe = await backend.core.start_pipeline(m, Pipeline((1, 1, 2, 2)), tl)
            assert pipe is not None and pipe.pipelined

            async def stream(i: int, started: asyncio.Event) -> list[int]:
                req = GenerationRequest(f"r{i}", name, PROMPTS[i], SamplingSpec(max_tokens=N_TOKENS, temperature=temp,
                                                                                  seed=7 + i, ignore_eos=True))
                out = []
                async for ev in backend.generate(req):
                    out.append(ev.token_id)
                    if len(out) == 3:
                        started.set()
                return out

            started = [asyncio.Event() for _ in PROMPTS]
            tasks = [asyncio.create_task(stream(i, started[i])) for i in range(len(PROMPTS))]
            await asyncio.gather(*(e.wait() for e in started))  # both are decoding on the pipeline
            await backend.core.start_instance(m, 2)  # node 2 now serves alone; its slots are kept for the pipeline
            assert len(pipe.server.reqs) == 2
            await backend.core.dissolve(m, pipe)
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return outs, backend
        finally:
            await backend.close()

    outs, backend = asyncio.run(asyncio.wait_for(main(), 180))
    assert outs == want
    if kv_move == "ship":
        assert backend.core.stats.kv_moves == {"shipped": 2, "recomputed": 0} and backend.core.stats.kv_bytes_shipped > 0
        assert backend.core.stats.requeued == 0  # nothing went back through the queue
    else:
        assert backend.core.stats.kv_moves == {"shipped": 0, "recomputed": 2} and backend.core.stats.requeued == 2
    assert backend.status().kv_moves == backend.core.stats.kv_moves
    metrics = GatewayMetrics()
    metrics.refresh(backend.status(), [name])
    text = metrics.render().decode()
    assert f'lambdascale_kv_moves_total{{how="shipped"}} {float(backend.core.stats.kv_moves["shipped"])}' in text
    assert f"lambdascale_kv_bytes_shipped_total {float(backend.core.stats.kv_bytes_shipped)}" in text


def test_full_instances_keep_slots_for_the_pipeline_over_their_node() -> None:
    """A live pipeline over nodes 1 and 2 with 3 requests: node 1's full instance keeps 2 slots
    (3 over 2 nodes, rounded up) away from the queue; node 3's keeps none; with recompute, none."""
    from types import SimpleNamespace

    from lambdascale.core.dispatch import kept_for_pipelines
    from lambdascale.core.state import Unit
    from lambdascale.pipe.serving import KvPolicy

    def unit(node: int, stages: tuple = (), reqs: int = 0, helpers: frozenset[int] = frozenset()) -> Unit:
        return Unit(f"i{node}{len(stages)}", "m", node, stages=stages, helpers=helpers,
                    server=SimpleNamespace(reqs=dict.fromkeys(range(reqs))))  # type: ignore[arg-type]

    pipe = unit(1, ((1, 0, 2), (2, 2, 4)), reqs=3)
    full1, full3 = unit(1), unit(3)
    for policy, want in ((KvPolicy.SHIP, {full1.id: 2}), (KvPolicy.AUTO, {full1.id: 2}), (KvPolicy.RECOMPUTE, {})):
        assert kept_for_pipelines([pipe, full1, full3], [pipe, full1, full3], policy) == want
    # node 3 lends a stage while serving alone: it keeps nothing, the share is over the receivers
    lent = unit(1, ((1, 0, 2), (2, 2, 3), (3, 3, 4)), reqs=3, helpers=frozenset({3}))
    assert kept_for_pipelines([lent, full1, full3], [lent, full1, full3], KvPolicy.AUTO) == {full1.id: 2}
    pipe.server.reqs.clear()  # type: ignore[union-attr]  # nothing left on the pipeline: nothing kept
    assert kept_for_pipelines([pipe, full1, full3], [pipe, full1, full3], KvPolicy.AUTO) == {}
