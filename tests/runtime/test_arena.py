"""The landing-zone arena (the store's range allocator over resident memory), and agents carving
model buffers from it."""

from __future__ import annotations

from pathlib import Path

from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.arena import Arena
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import DropModel, GetStatus, HoldModel, Warmup
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async


def test_arena_hands_out_views_of_its_memory() -> None:
    a = Arena(3 * 4096)
    got = a.take(5000)
    assert got is not None
    rng, view = got
    off = rng.offset
    assert len(view) == 5000 and view.base is not None
    view[:] = 7
    assert (a.memory[off:off + 5000] == 7).all() and a.memory[off + 5000:].sum() == 0
    assert a.take(8192) is None  # 5000 rounds up to two pages: one page left
    a.give(rng)
    assert a.free_bytes == a.size == 3 * 4096 and a.take(3 * 4096) is not None


def test_agents_carve_models_from_the_arena_and_give_them_back(tiny_model: Path) -> None:
    manifest = read_manifest(tiny_model)
    size = manifest.total_bytes
    arena_gb = 2.5 * size / 1e9  # room for two copies of the model, not three

    async def main() -> None:
        rs = RuntimeSettings(heartbeat_s=0.5, device_arena_gb=arena_gb)
        async with LocalCluster(2, runtime=rs) as lc:
            c = lc.cluster
            warm = await c.request(1, Warmup(req=0))
            total = warm["arena_bytes"]
            assert total == int(arena_gb * 1e9)
            free0 = (await c.request(1, GetStatus(req=0)))["arena_free_bytes"]
            await c.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            await prepare_receivers(c, manifest, [1])
            free1 = (await c.request(1, GetStatus(req=0)))["arena_free_bytes"]
            assert free0 - free1 >= size  # the landing zone came out of the arena
            res = await run_multicast(c, manifest, [0], [1])
            assert set(res.node_full_s) == {1}
            st = await c.request(1, GetStatus(req=0))
            assert st["models"][manifest.name] == list(range(manifest.n_chunks))
            assert st["block_digests"] == (await c.request(0, GetStatus(req=0)))["block_digests"]
            await c.request(1, DropModel(req=0, model=manifest.name))
            assert (await c.request(1, GetStatus(req=0)))["arena_free_bytes"] == free0
        # a model that does not fit the arena still lands, in a fresh buffer, and reads correctly
        small = RuntimeSettings(heartbeat_s=0.5, device_arena_gb=0.5 * size / 1e9)
        async with LocalCluster(1, runtime=small) as lc:
            await lc.cluster.request(0, Warmup(req=0))  # the arena is resident once Warmup answers
            free = (await lc.cluster.request(0, GetStatus(req=0)))["arena_free_bytes"]
            ok = await lc.cluster.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            assert ok["held"] == list(range(manifest.n_chunks))
            assert (await lc.cluster.request(0, GetStatus(req=0)))["arena_free_bytes"] == free > 0
        async with LocalCluster(1, runtime=RuntimeSettings(heartbeat_s=0.5)) as lc:
            assert (await lc.cluster.request(0, Warmup(req=0)))["arena_bytes"] == 0
            assert (await lc.cluster.request(0, GetStatus(req=0)))["arena_free_bytes"] is None

    run_async(main())


def test_an_arena_that_cannot_be_made_leaves_models_on_fresh_buffers(tiny_model: Path) -> None:
    """100 TB of arena cannot be allocated: the agent logs a warning, reports no arena, and
    holds a model in a fresh buffer as if none had been asked for."""
    manifest = read_manifest(tiny_model)

    async def main() -> None:
        async with LocalCluster(1, runtime=RuntimeSettings(heartbeat_s=0.5, device_arena_gb=1e5)) as lc:
            assert (await lc.cluster.request(0, Warmup(req=0)))["arena_bytes"] == 0
            ok = await lc.cluster.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            assert ok["held"] == list(range(manifest.n_chunks))
            st = await lc.cluster.request(0, GetStatus(req=0))
            assert st["arena_free_bytes"] is None and st["models"][manifest.name] == ok["held"]

    run_async(main())
