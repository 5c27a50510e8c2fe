"""The landing-zone arena: the pure free list, and agents carving model buffers from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.arena import Arena, FreeList
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import DropModel, GetStatus, HoldModel, Warmup
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async


def _check(fl: FreeList) -> None:
    ranges = sorted(list(fl.used.items()) + fl._free)
    pos = 0
    for off, n in ranges:  # used and free ranges tile [0, usable) exactly, aligned
        assert off == pos and n > 0 and off % fl.align == 0 and n % fl.align == 0
        pos += n
    assert pos == fl.size - fl.size % fl.align
    free = fl._free
    assert all(a[0] + a[1] < b[0] for a, b in zip(free, free[1:]))  # coalesced: no two free ranges touch


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9000)), max_size=60))
def test_free_list_tiles_and_coalesces(ops: list[tuple[bool, int]]) -> None:
    fl = FreeList(40_000, align=1024)
    held: list[int] = []
    for give, n in ops:
        if give and held:
            fl.give(held.pop(n % len(held)))
        else:
            before = fl.free_bytes
            off = fl.take(n)
            if off is None:  # first fit failed: no free range is long enough
                assert all(length < -(-n // 1024) * 1024 for _, length in fl._free)
            else:
                held.append(off)
                assert fl.free_bytes == before - -(-n // 1024) * 1024
        _check(fl)
    for off in held:
        fl.give(off)
    assert fl._free == [(0, 39_936)] and not fl.used


def test_free_list_rejects_bad_calls() -> None:
    fl = FreeList(8192, align=4096)
    with pytest.raises(ValueError, match="must be > 0 bytes"):
        fl.take(0)
    off = fl.take(1)
    assert off == 0 and fl.take(4097) is None and fl.take(4096) == 4096
    with pytest.raises(ValueError, match="not an allocated range"):
        fl.give(123)


def test_arena_hands_out_views_of_its_memory() -> None:
    a = Arena(3 * 4096)
    got = a.take(5000)
    assert got is not None
    off, view = got
    assert len(view) == 5000 and view.base is not None
    view[:] = 7
    assert (a.memory[off:off + 5000] == 7).all() and a.memory[off + 5000:].sum() == 0
    assert a.take(8192) is None  # 5000 rounds up to two pages: one page left
    a.give(off)
    assert a.take(3 * 4096) is not None


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
