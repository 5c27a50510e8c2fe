"""Tiered store and pipelined loader: announcements, verification, leases, capacity, rate cap."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.clock import ManualClock
from lambdascale.errors import CheckpointError, LambdaScaleError
from lambdascale.model.checkpoint import Checkpoint
from lambdascale.model.importers import import_model
from lambdascale.store.loader import BlockLanded, Tier, load_from_ssd
from lambdascale.store.pool import RangeAllocator
from lambdascale.store.settings import StoreSettings
from lambdascale.store.tiers import BlockState, MemoryTier, NodeStore, StoreFullError


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=3, name="a")
    import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=2, name="b", seed=1)
    import_model("synthetic:tiny-llama", d, n_blocks=2, chunks_per_block=2, name="c", seed=2)
    return d


def _store(models: Path, mb: float = 8.0, **kw) -> NodeStore:
    s = StoreSettings(host_capacity_gb=mb / 1000, keep_alive_s=10.0, pool_align=4096, **kw)
    return NodeStore(models, s, clock=ManualClock())


def test_load_host_announces_blocks_in_order_as_they_land(models: Path) -> None:
    store = _store(models)
    seen: list[BlockLanded] = []
    later_loading: list[bool] = []

    def on_block(ev: BlockLanded) -> None:
        seen.append(ev)
        res = store.host.models["a"]
        # when block b is announced the later blocks are not yet usable (execute-while-load)
        later_loading.append(all(res.state[x] is BlockState.LOADING for x in range(ev.block + 1, 4)))

    stats = store.load_host("a", on_block=on_block)
    ck = Checkpoint(models / "a")
    assert [e.block for e in seen] == [0, 1, 2, 3] and all(later_loading)
    assert stats.nbytes == ck.manifest.total_bytes
    for ev in seen:
        ref = ck.block_tensors(ev.block)
        assert ev.tier is Tier.HOST and list(ev.tensors) == list(ref)
        assert all(torch.equal(ev.tensors[k], ref[k]) for k in ref)
        # tensors live inside the pool (zero copy)
        base = store.pool.buffer.data_ptr()
        p = next(iter(ev.tensors.values())).data_ptr()
        assert base <= p < base + store.pool.capacity
    assert store.holdings()["a"].tiers == {Tier.HOST, Tier.SSD}
    assert store.fastest_tier("a") is Tier.HOST and store.fastest_tier("b") is Tier.SSD
    # a second load is served from the host tier: nothing read, every block announced again
    again: list[int] = []
    assert store.load_host("a", on_block=lambda ev: again.append(ev.block)).nbytes == 0 and again == [0, 1, 2, 3]


def test_corrupted_chunk_stops_the_load_and_is_never_announced(models: Path) -> None:
    ck = Checkpoint(models / "a")
    m = ck.manifest
    blk = m.blocks[2]
    at = blk.nbytes // 2  # a byte in the middle of block 2's file, and the chunk holding it
    bad = next(ch for ch in m.chunks if ch.offset <= blk.offset + at < ch.end)
    with open(ck.block_path(2), "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    store = _store(models)
    announced: list[int] = []
    with pytest.raises(CheckpointError, match=rf"block_002\.safetensors: chunk {bad.index} .*corrupted"):
        store.load_host("a", on_block=lambda ev: announced.append(ev.block))
    assert announced in ([], [0], [0, 1])  # earlier blocks may land; block 2 and later never do
    assert "a" not in store.host.models and store.pool.allocator.used == 0  # nothing half-loaded stays


def test_truncated_file_fails_the_load(models: Path) -> None:
    ck = Checkpoint(models / "b")
    p = ck.block_path(1)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1)
    store = _store(models)
    with pytest.raises(CheckpointError, match=r"block_001\.safetensors: file has .* bytes, manifest says"):
        store.load_host("b")
    assert store.pool.allocator.used == 0


def test_leased_model_is_never_evicted_and_capacity_holds(models: Path) -> None:
    size_a = Checkpoint(models / "a").manifest.total_bytes
    store = _store(models, mb=(size_a * 1.6) / 1e6)  # room for one model of this size, not two
    store.load_host("a")
    with store.lease("a"):
        with pytest.raises(StoreFullError, match="held by models in use or inside keep-alive"):
            store.load_host("b")
        assert "a" in store.host.models
    store.load_host("b")  # a is free now: evicted (LRU) to make room
    assert "a" not in store.host.models and "b" in store.host.models
    assert store.pool.allocator.used <= store.pool.capacity
    store.pool.allocator.check()


def test_strict_keep_alive_refuses_instead_of_evicting(models: Path) -> None:
    size_a = Checkpoint(models / "a").manifest.total_bytes
    store = _store(models, mb=(size_a * 1.6) / 1e6, strict_keep_alive=True)
    store.load_host("a")
    with pytest.raises(StoreFullError):
        store.load_host("b")
    store.clock.advance(11.0)  # type: ignore[attr-defined]
    store.load_host("b")
    assert set(store.host.models) == {"b"}


def test_ssd_rate_cap_slows_reads(models: Path) -> None:
    ck = Checkpoint(models / "a")
    n = ck.manifest.total_bytes
    gbps = n / 0.25 / 1e9  # the whole model should take about 0.25 s at this rate
    store = NodeStore(models, StoreSettings(host_capacity_gb=0.01, ssd_gbps=gbps), clock=ManualClock())
    t0 = time.perf_counter()
    stats = store.load_host("a")
    took = time.perf_counter() - t0
    assert took >= 0.2 and stats.waited_on_rate_s > 0.1


def test_async_stream_yields_blocks(models: Path) -> None:
    store = _store(models)

    async def collect() -> list[int]:
        return [ev.block async for ev in store.stream("c")]

    assert asyncio.run(collect()) == [0, 1]

    async def missing() -> None:
        async for _ in store.stream("nope"):
            pass

    with pytest.raises(LambdaScaleError, match="model 'nope' not found"):
        asyncio.run(missing())


def test_device_tier_on_cpu_copies_and_announces(models: Path) -> None:
    s = StoreSettings(host_capacity_gb=0.008, gpu_capacity_gb=0.004, keep_alive_s=1.0)
    store = NodeStore(models, s, clock=ManualClock(), device="cpu")
    seen: list[BlockLanded] = []
    store.load("a", Tier.GPU, on_block=seen.append)
    ck = Checkpoint(models / "a")
    assert [e.block for e in seen] == [0, 1, 2, 3] and all(e.tier is Tier.GPU for e in seen)
    for ev in seen:
        ref = ck.block_tensors(ev.block)
        assert all(torch.equal(ev.tensors[k], ref[k]) for k in ref)
        base = store.pool.buffer.data_ptr()
        assert not base <= next(iter(ev.tensors.values())).data_ptr() < base + store.pool.capacity  # a copy
    h = store.holdings()["a"]
    assert h.tiers == {Tier.GPU, Tier.HOST, Tier.SSD} and h.gpu_blocks == {0, 1, 2, 3}
    assert store.fastest_tier("a") is Tier.GPU


def test_no_gpu_tier_is_a_clear_error(models: Path) -> None:
    store = _store(models)
    with pytest.raises(LambdaScaleError, match="no gpu memory tier"):
        store.load("a", Tier.GPU)


@pytest.mark.parametrize("direct,threads,piece", [(True, 4, 4096), (False, 1, 1 << 20), (True, 2, 8192)])
def test_loader_paths_agree(models: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, threads: int, piece: int) -> None:
    import lambdascale.store.loader as L
    from lambdascale.store.pool import HostPool

    calls = {"direct": 0}
    real = L._read_direct

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls["direct"] += 1
        return real(*a, **k)

    monkeypatch.setattr(L, "_read_direct", counting)
    ck = Checkpoint(models / "a")
    pool = HostPool(8 << 20, pinned=False)
    allocs = {b.index: pool.alloc(b.nbytes) for b in ck.manifest.blocks}
    got: dict[int, dict[str, torch.Tensor]] = {}
    stats = load_from_ssd(ck, lambda b: pool.view_padded(allocs[b]), on_block=lambda ev: got.__setitem__(ev.block, ev.tensors),
                          io_threads=threads, direct=direct, piece_bytes=piece)
    assert stats.nbytes == ck.manifest.total_bytes and list(got) == [0, 1, 2, 3]
    for b in got:
        ref = ck.block_tensors(b)
        assert all(torch.equal(got[b][k], ref[k]) for k in ref)
    if direct and L._open_direct(ck.block_path(0)) is not None:
        assert calls["direct"] > 0
    if not direct:
        assert calls["direct"] == 0


def test_partial_load_verifies_spanning_chunks_with_the_neighbour_file(models: Path) -> None:
    """Loading one block reads its boundary chunks' parts in the neighbour files (only to hash
    them): the block lands intact, and a corrupt byte in a neighbour's part fails the load."""
    ck = Checkpoint(models / "a")
    m = ck.manifest
    b = next(b for b in range(m.n_blocks) if any(len(m.blocks_of_chunk(c)) == 2 for c in m.chunks_of_block(b)))
    buf = bytearray(m.blocks[b].nbytes)
    got: list[int] = []
    stats = load_from_ssd(ck, lambda _: memoryview(buf), blocks=[b], on_block=lambda ev: got.append(ev.block),
                          direct=False, piece_bytes=4096)
    assert got == [b] and bytes(buf) == bytes(ck.read_block(b)) and stats.nbytes == m.blocks[b].nbytes
    c = next(c for c in m.chunks_of_block(b) if len(m.blocks_of_chunk(c)) == 2)
    other = next(x for x in m.blocks_of_chunk(c) if x != b)
    ch, nb = m.chunk(c), m.blocks[other]
    at = max(ch.offset, nb.offset) - nb.offset  # the chunk's first byte inside the neighbour's file
    with open(ck.block_path(other), "r+b") as f:
        f.seek(at)
        x = f.read(1)
        f.seek(at)
        f.write(bytes([x[0] ^ 1]))
    got.clear()
    with pytest.raises(CheckpointError, match=rf"block_{other:03d}\.safetensors.*: chunk {c} .*corrupted"):
        load_from_ssd(ck, lambda _: memoryview(buf), blocks=[b], on_block=lambda ev: got.append(ev.block), direct=False)
    assert got == []


def test_direct_loader_checks_destination_size(models: Path) -> None:
    ck = Checkpoint(models / "c")
    with pytest.raises(ValueError, match="destination of block 0 holds 10 bytes"):
        load_from_ssd(ck, lambda b: memoryview(bytearray(10)))


# ---- random operation sequences on one tier (fake checkpoints, no I/O) ------------------------

def _fake_ckpt(name: str, sizes: list[int]) -> SimpleNamespace:
    blocks = [SimpleNamespace(index=i, nbytes=n) for i, n in enumerate(sizes)]
    return SimpleNamespace(name=name, manifest=SimpleNamespace(blocks=blocks, n_blocks=len(blocks)))


op_st = st.tuples(
    st.sampled_from(["load", "lease", "release", "evict", "tick"]),
    st.integers(0, 5),
    st.lists(st.integers(1, 30_000), min_size=1, max_size=4),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(op_st, max_size=60), st.booleans())
def test_tier_random_ops_never_overcommit_or_evict_leased(ops, strict: bool) -> None:
    cap = 100_000
    tier = MemoryTier(Tier.HOST, RangeAllocator(cap, 512), keep_alive_s=3.0, strict_keep_alive=strict,
                      storage=lambda a: torch.empty(0, dtype=torch.uint8))
    now = 0.0
    leases: dict[str, int] = {}
    for kind, i, sizes in ops:
        name = f"m{i}"
        if kind == "tick":
            now += 1.0
        elif kind == "load" and name not in tier.models:
            before = set(tier.models)
            try:
                tier.reserve(_fake_ckpt(name, sizes), now)  # starts leased by its load ...
                for b in range(len(sizes)):
                    tier.mark_ready(name, b)
                tier.release(name, now)                      # ... released when it completes
            except StoreFullError:
                assert set(tier.models) == before  # a refused load evicts nothing
            # leased models survived whatever happened
            assert all(m in tier.models for m, n in leases.items() if n > 0)
        elif kind == "lease" and name in tier.models:
            tier.lease(name, now)
            leases[name] = leases.get(name, 0) + 1
        elif kind == "release" and leases.get(name, 0) > 0:
            tier.release(name, now)
            leases[name] -= 1
        elif kind == "evict" and name in tier.models:
            if leases.get(name, 0) > 0:
                with pytest.raises(LambdaScaleError, match="never evicted"):
                    tier.evict(name)
            else:
                tier.evict(name)
        tier.allocator.check()
        assert tier.allocator.used <= cap
        assert sum(e.nbytes for e in tier.entries()) == tier.allocator.used
        assert all(m in tier.models for m, n in leases.items() if n > 0)
        leases = {m: n for m, n in leases.items() if m in tier.models}


def test_concurrent_loads_of_one_model_share_the_work(models: Path) -> None:
    import threading

    store = _store(models)
    results = []
    seen: list[list[int]] = [[], [], []]

    def go(i: int) -> None:
        results.append(store.load_host("a", on_block=lambda ev: seen[i].append(ev.block)).nbytes)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = Checkpoint(models / "a").manifest.total_bytes
    assert sorted(results) == [0, 0, total]        # read from SSD once
    assert all(s == [0, 1, 2, 3] for s in seen)     # every caller saw every block
    assert store.host.cache.get("a").leases == 0 and store.pool.allocator.used > 0
