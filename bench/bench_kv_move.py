"""What a request pays when its pipeline dissolves in the gateway: KV shipped against recomputed.

Three agents on 127.0.0.1 (``ClusterBackend``, no autoscaler): a two-stage λPipe pipeline over
nodes 1 and 2 serves ``--requests`` greedy requests with ``--prompt-len``-token prompts; once each
has streamed a few tokens, node 2 starts a full instance and the pipeline dissolves, as in a
scale-out when node 2 has received the whole model. With ``runtime.kv_move: ship`` the requests'
KV goes to node 2's instance and they continue with a decode step; with ``recompute`` they go back
through the queue and node 2 prefills prompt and outputs again. Side by side in one run
(alternating, ``--repeat`` times each), per request: the stall (from its last token on the
pipeline to its first on the full instance) and whether the text equals a single engine's.

    python bench/bench_kv_move.py [--layers 4] [--prompt-len 384] [--requests 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path


async def one_run(model_dir: Path, kv_move: str, prompts: list[list[int]], n_tokens: int) -> dict:
    from lambdascale.config import load_config
    from lambdascale.control.timeline import ScaleTimeline
    from lambdascale.pipe.pipelines import Pipeline
    from lambdascale.runtime.messages import HoldModel
    from lambdascale.serve.backend import GenerationRequest, SamplingSpec
    from lambdascale.serve.cluster_backend import ClusterBackend
    from lambdascale.serve.schemas import DeploySpec

    name = model_dir.name
    cfg = load_config(None, {"runtime.nodes": 3, "engine.max_batch_size": len(prompts), "engine.max_model_len": 2048,
                             "runtime.kv_move": kv_move})
    backend = ClusterBackend(cfg, model_dir.parent, autoscale=False)
    await backend.start()
    try:
        await backend.deploy(DeploySpec(name=name, min_instances=1))
        m = backend.core.deployments[name]
        (first,) = m.units
        first.draining = True  # the requests can only go to the pipeline
        m.wakeup.set()
        while first in m.units:
            await asyncio.sleep(0.01)
        await asyncio.gather(*(backend.cluster.request(n, HoldModel(req=0, model_dir=str(model_dir))) for n in (1, 2)))
        tl = ScaleTimeline(event_id=0, model=name, decided_at=backend.clock.now())
        pipe = await backend.core.start_pipeline(m, Pipeline((1, 1, 2, 2)), tl)
        assert pipe is not None
        stamps: list[list[float]] = [[] for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        started = [asyncio.Event() for _ in prompts]

        async def stream(i: int) -> None:
            req = GenerationRequest(f"r{i}", name, tuple(prompts[i]), SamplingSpec(max_tokens=n_tokens, temperature=0,
                                                                                  ignore_eos=True))
            async for ev in backend.generate(req):
                tokens[i].append(ev.token_id)
                stamps[i].append(time.monotonic())
                if len(tokens[i]) == 3:
                    started[i].set()

        tasks = [asyncio.create_task(stream(i)) for i in range(len(prompts))]
        await asyncio.gather(*(e.wait() for e in started))
        await backend.core.start_instance(m, 2)
        await backend.core.dissolve(m, pipe)  # drains the pipeline's steps in flight, then moves the requests
        moved_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 600)
        # the stall: from a request's last token on the pipeline to its first on the full instance
        stall = []
        for ts in stamps:
            before = [t for t in ts if t <= moved_at]
            after = [t for t in ts if t > moved_at]
            if not before or not after:
                raise SystemExit("a request finished before the pipeline dissolved: raise --tokens")
            stall.append(after[0] - before[-1])
        return {"stall_s": stall, "tokens": tokens, "kv_moves": dict(backend.core.stats.kv_moves),
                "kv_bytes": backend.core.stats.kv_bytes_shipped}
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-0.5b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    import random

    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.importers import import_model

    with tempfile.TemporaryDirectory(prefix="lambdascale-bench-kv-") as tmp:
        ck = import_model(f"synthetic:{args.shape}", Path(tmp), layers=args.layers, n_blocks=4, chunks_per_block=1)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, ck.arch.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        eng = Engine.from_checkpoint(ck.dir)
        want = [[t for o in eng.generate(p, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
                 for t in o.token_ids] for p in prompts]
        del eng
        runs: dict[str, list[dict]] = {"ship": [], "recompute": []}
        for _ in range(args.repeat):
            for how in runs:  # alternate, so load drifts hit both
                runs[how].append(asyncio.run(one_run(ck.dir, how, prompts, args.tokens)))
    print(f"KV move at dissolution, gateway, {args.shape} x {args.layers} layers, {args.requests} requests x "
          f"{args.prompt_len}-token prompts, {args.repeat} runs each ({time.strftime('%Y-%m-%d %H:%M')} UTC)")
    print(f"{'kv_move':10} {'stall median s':>14} {'stall range s':>16} {'shipped':>7} {'MiB shipped/run':>15} {'exact':>5}")
    for how, rs in runs.items():
        stalls = [s for r in rs for s in r["stall_s"]]
        shipped = sum(r["kv_moves"]["shipped"] for r in rs)
        exact = all(r["tokens"] == want for r in rs)
        mib = statistics.mean(r["kv_bytes"] for r in rs) / 2**20
        print(f"{how:10} {statistics.median(stalls):>14.3f} {min(stalls):>7.3f}-{max(stalls):<8.3f} {shipped:>7} "
              f"{mib:>15.1f} {str(exact):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
