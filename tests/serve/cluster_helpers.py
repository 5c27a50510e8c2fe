"""Helpers for gateway tests on real node agents: a gateway over a local cluster, a burst of
completions, waiting on its status, and a single engine's reference ids."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import httpx

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

#: 3 Mbit/s links in small slices: a 1.3 MB tiny model takes seconds to reach a new node
SLOW_LINKS = {"transfer.link_gbps": 0.003, "transfer.bucket_burst_bytes": 32768, "transfer.io_slice_bytes": 16384}


@contextlib.contextmanager
def cluster_gateway(tmp_path: Path, overrides: dict[str, Any],
                    specs: Sequence[DeploySpec]) -> Iterator[tuple[ClusterBackend, ServerThread]]:
    """A gateway on the cluster backend (agents on 127.0.0.1) serving ``specs``; stopped on exit."""
    cfg = load_config(None, {"runtime.register_timeout_s": 240, "engine.max_batch_size": 2,
                             "engine.max_model_len": 256, **overrides})
    backend = ClusterBackend(cfg, tmp_path)
    reg = ModelRegistry(":memory:")
    for spec in specs:
        reg.put(spec)
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=300)
    try:
        yield backend, server
    finally:
        server.stop(timeout_s=60)


def burst(url: str, bodies: Sequence[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body to /v1/completions at once; the responses in order."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=180) as c:
            return list(await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies)))

    return asyncio.run(run())


def wait_status(url: str, done: Callable[[dict], bool], timeout_s: float = 120.0) -> dict:
    """Poll /admin/status until ``done(status)`` or the timeout; the last status either way."""
    deadline = time.monotonic() + timeout_s
    st = httpx.get(url + "/admin/status").json()
    while time.monotonic() < deadline and not done(st):
        time.sleep(0.1)
        st = httpx.get(url + "/admin/status").json()
    return st


def greedy_ids(model_dir: Path, prompt: list[int], n_tokens: int) -> list[int]:
    """A single engine's greedy ids for ``prompt`` (the exactness reference)."""
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams

    eng = Engine.from_checkpoint(model_dir)
    return [t for o in eng.generate(prompt, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
            for t in o.token_ids]
