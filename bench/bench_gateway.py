"""Gateway overhead: added p50 latency per request against calling the engine in-process (goal <= 5 ms).

Two pairs, measured side by side in one run, requests interleaved so machine noise hits both:

* ``engine``: the demo model (SmolLM2-135M) greedy, ``--max-tokens`` tokens. Direct = ``Engine.generate``
  in this process; gateway = ``POST /v1/completions`` over HTTP to a uvicorn gateway (same process,
  its own thread) running the in-process ``EngineBackend``.
* ``fake``: the zero-cost fake backend, so the difference is the gateway alone (HTTP, validation,
  tokenization, detokenization, JSON). Direct = iterating ``FakeBackend.generate``.

Usage: ``.venv/bin/python bench/bench_gateway.py [--requests 40] [--max-tokens 8] [--skip-engine]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.backend import GenerationRequest, SamplingSpec
from lambdascale.serve.fake import FakeBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

PROMPT = "The sky is"


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def serve(backend, model: str, cfg) -> ServerThread:  # type: ignore[no-untyped-def]
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=model))
    return ServerThread(create_app(cfg, backend, registry=reg)).start()


def bench_fake(n: int, max_tokens: int) -> tuple[list[float], list[float]]:
    cfg = load_config()
    backend = FakeBackend(slots_per_instance=64)
    server = serve(backend, "fake", cfg)
    codec = None
    direct, via = [], []
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    try:
        with httpx.Client(base_url=server.url) as c:
            c.post("/v1/completions", json=body)  # warm-up

            async def call_direct(i: int) -> None:
                nonlocal codec
                codec = backend.codec("fake")
                req = GenerationRequest(f"d{i}", "fake", tuple(codec.encode(PROMPT)), SamplingSpec(max_tokens=max_tokens, temperature=0))
                ids = [ev.token_id async for ev in backend.generate(req)]
                codec.decode(ids)

            for i in range(n):
                t = time.perf_counter()
                server.call(lambda i=i: call_direct(i))
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                via.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    return direct, via


def bench_engine(n: int, max_tokens: int, models_dir: Path) -> tuple[list[float], list[float]]:
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.checkpoint import find_model
    from lambdascale.serve.engine_backend import EngineBackend

    cfg = load_config(None, {"engine.threads": 1, "engine.max_batch_size": 4})
    engine = Engine.from_checkpoint(find_model(models_dir, "smollm2-135m"), cfg.engine)
    server = serve(EngineBackend(cfg, models_dir), "smollm2-135m", cfg)
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    direct, via = [], []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            c.post("/v1/completions", json=body)
            list(engine.generate(PROMPT, params))
            for _ in range(n):
                t = time.perf_counter()
                "".join(o.text for o in engine.generate(PROMPT, params))
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                via.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    return direct, via


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/lambdascale/test-models/v1",
                    help="directory holding smollm2-135m (imported by the test suite or `lambdascale import`)")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    rows = []
    d, v = bench_fake(args.requests, args.max_tokens)
    rows.append(("fake backend", p50(d), p50(v)))
    if not args.skip_engine:
        if not (args.models_dir / "smollm2-135m").is_dir():
            print(f"no smollm2-135m under {args.models_dir}; run `lambdascale import smollm2-135m` or --skip-engine", file=sys.stderr)
            return 2
        d, v = bench_engine(args.requests, args.max_tokens, args.models_dir)
        rows.append(("engine (smollm2-135m)", p50(d), p50(v)))
    print(f"{args.requests} requests each, {args.max_tokens} tokens, greedy; p50 latency per request")
    print(f"{'backend':<24}{'in-process ms':>15}{'via gateway ms':>16}{'added ms':>10}")
    for name, a, b in rows:
        print(f"{name:<24}{a:>15.2f}{b:>16.2f}{b - a:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
