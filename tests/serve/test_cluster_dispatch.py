"""The cluster backend routes with the control plane's late-binding ``dispatch``: a backlog waits at
the gateway (not behind a busy instance), drains onto a new instance the moment it is full, no
request overtakes an older one, and every output equals a single-engine run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lambdascale.config import load_config
from lambdascale.serve.backend import GenerationRequest, SamplingSpec
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.schemas import DeploySpec

N_REQ = 8
N_TOK = 6


def _prompt(i: int) -> tuple[int, ...]:
    return tuple(1 + (7 * i + 3 * j) % 200 for j in range(4 + i % 3))


async def _collect(backend: ClusterBackend, req: GenerationRequest) -> list[int]:
    return [ev.token_id async for ev in backend.generate(req)]


async def _wait_until(cond, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_backlog_drains_onto_a_new_instance_in_fifo_order_with_exact_outputs(tmp_path: Path) -> None:
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=2, chunks_per_block=1)
    name = ck.dir.name
    eng = Engine.from_checkpoint(ck.dir)
    want = {f"r{i}": [t for o in eng.generate(list(_prompt(i)), SamplingParams(max_tokens=N_TOK, temperature=0,
                                                                              ignore_eos=True))
                      for t in o.token_ids] for i in range(N_REQ)}
    cfg = load_config(None, {"runtime.nodes": 2, "runtime.register_timeout_s": 240, "engine.max_batch_size": 2,
                             "engine.max_model_len": 128})

    async def run() -> tuple[dict[str, list[int]], list[tuple[str, str, str]], int, list[tuple[str, str, str]]]:
        backend = ClusterBackend(cfg, tmp_path, autoscale=False)
        await backend.start()
        try:
            await backend.deploy(DeploySpec(name=name, min_instances=1, max_instances=2))
            m = backend.core.deployments[name]
            (first,) = m.serving
            # Freeze the first instance between steps: its two slots fill, the rest must wait at the gateway.
            await first.lock.acquire()
            tasks = {f"r{i}": asyncio.create_task(_collect(backend, GenerationRequest(
                f"r{i}", name, _prompt(i), SamplingSpec(max_tokens=N_TOK, temperature=0, ignore_eos=True))))
                for i in range(N_REQ)}
            await _wait_until(lambda: len(backend.core.dispatch_log) == 2 and len(m.queue) == N_REQ - 2, 60)
            before = list(backend.core.dispatch_log)
            # A second instance becomes full: the very next dispatch hands it the backlog's oldest two.
            await backend.core.start_instance(m, 1)
            taken = backend.core.dispatch(m)
            after_start = list(backend.core.dispatch_log)[2:]
            first.lock.release()
            outs = dict(zip(tasks, await asyncio.wait_for(asyncio.gather(*tasks.values()), 120)))
            return outs, before, taken, after_start + list(backend.core.dispatch_log)[2 + len(after_start):]
        finally:
            await backend.close()

    outs, before, taken, later = asyncio.run(run())
    assert [(rid, inst) for _, rid, inst in before] == [("r0", f"{name}@0"), ("r1", f"{name}@0")]
    assert taken == 2
    assert [(rid, inst) for _, rid, inst in later[:2]] == [("r2", f"{name}@1"), ("r3", f"{name}@1")]
    order = [rid for _, rid, _ in before + later]
    assert order == [f"r{i}" for i in range(N_REQ)]  # dispatched oldest first: nothing overtook
    assert {inst for _, _, inst in later} >= {f"{name}@1"}
    assert outs == want
