"""Scale-outs through the gateway run side by side: two models' multicasts (each reads its own
queue of the cluster's events), and one model's successive scale-outs (each multicast is its own
run on the shared source), instead of one waiting for the other; everything serves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

PROMPT = [1, 5, 9, 13]


def test_bursts_on_two_models_spread_both_at_once(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    names = [import_model("synthetic:tiny-llama", tmp_path, name=n, n_blocks=4, chunks_per_block=2, seed=i).dir.name
             for i, n in enumerate(("tiny-a", "tiny-b"))]
    # 3 Mbit/s links: each 1.3 MB model takes seconds to reach its new node
    cfg = load_config(None, {
        "runtime.nodes": 4, "runtime.register_timeout_s": 240, "engine.max_batch_size": 2,
        "engine.max_model_len": 256, "control.autoscale_interval_s": 1.0, "transfer.link_gbps": 0.003,
        "transfer.bucket_burst_bytes": 32768, "transfer.io_slice_bytes": 16384})
    backend = ClusterBackend(cfg, tmp_path)
    reg = ModelRegistry(":memory:")
    for n in names:
        reg.put(DeploySpec(name=n, min_instances=1, max_instances=2, target_concurrency=1))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=300)
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=180) as c:
                return list(await asyncio.gather(*(
                    c.post("/v1/completions", json={"model": n, "prompt": PROMPT, "max_tokens": 120, "temperature": 0,
                                                    "ignore_eos": True})
                    for n in names for _ in range(4))))

        responses = asyncio.run(burst())

        def spread(st: dict) -> dict[str, dict]:
            """Each model's finished multicast timeline (a network scale-out that filled its targets)."""
            return {t["model"]: t for t in st["scale_timelines"]
                    if t["first_chunk_at"] is not None and t["targets"] and len(t["node_full_at"]) == len(t["targets"])}

        deadline = time.monotonic() + 120
        st = httpx.get(server.url + "/admin/status").json()
        while time.monotonic() < deadline and not (backend.scale_outs_in_progress == 0 and len(spread(st)) == 2):
            time.sleep(0.1)
            st = httpx.get(server.url + "/admin/status").json()
    finally:
        server.stop(timeout_s=60)
    assert [r.status_code for r in responses] == [200] * 8
    tl = spread(st)
    assert set(tl) == set(names), st["scale_timelines"]
    a, b = (tl[n] for n in names)
    # the windows [first chunk, last node full] overlap: neither multicast waited for the other
    assert a["first_chunk_at"] < max(b["node_full_at"].values()) and b["first_chunk_at"] < max(a["node_full_at"].values())


def test_successive_scale_outs_of_one_model_multicast_side_by_side(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    name = import_model("synthetic:tiny-llama", tmp_path, name="tiny-a", n_blocks=4, chunks_per_block=2).dir.name
    # one instance more per 1 s tick, while each multicast over 3 Mbit/s links takes seconds
    cfg = load_config(None, {
        "runtime.nodes": 4, "runtime.register_timeout_s": 240, "engine.max_batch_size": 2,
        "engine.max_model_len": 256, "control.autoscale_interval_s": 1.0, "control.scale_max_add_per_tick": 1,
        "transfer.link_gbps": 0.003, "transfer.bucket_burst_bytes": 32768, "transfer.io_slice_bytes": 16384})
    backend = ClusterBackend(cfg, tmp_path)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=name, min_instances=1, max_instances=4, target_concurrency=1))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=300)
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=180) as c:
                return list(await asyncio.gather(*(
                    c.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 150,
                                                    "temperature": 0, "ignore_eos": True})
                    for _ in range(8))))

        responses = asyncio.run(burst())

        def spread(st: dict) -> list[dict]:
            return [t for t in st["scale_timelines"] if t["model"] == name and t["first_chunk_at"] is not None
                    and t["targets"] and len(t["node_full_at"]) == len(t["targets"])]

        deadline = time.monotonic() + 120
        st = httpx.get(server.url + "/admin/status").json()
        while time.monotonic() < deadline and not (backend.scale_outs_in_progress == 0 and len(spread(st)) >= 2):
            time.sleep(0.1)
            st = httpx.get(server.url + "/admin/status").json()
    finally:
        server.stop(timeout_s=60)
    assert [r.status_code for r in responses] == [200] * 8
    tl = sorted(spread(st), key=lambda t: t["first_chunk_at"])
    assert len(tl) >= 2, st["scale_timelines"]
    a, b = tl[0], tl[1]
    assert set(a["targets"]).isdisjoint(b["targets"])
    # the second scale-out's first chunk came before the first's last node was full
    assert b["first_chunk_at"] < max(a["node_full_at"].values()), (a, b)
