"""The multicast executor on real agent processes over 127.0.0.1, clean and under faults."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import xxhash

from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.cluster import NodeLost
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import ChunkHeld, CorruptNext, GetStatus, HoldModel
from lambdascale.runtime.multicast import MulticastProgress, prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings
from tests.runtime.conftest import run_async

# ~2.5 MB/s links with a small bucket: a 1.3 MB model takes about half a second to spread,
# long enough to kill a node in the middle.
SLOW = TransferSettings(link_gbps=0.02, bucket_burst_bytes=32 << 10, io_slice_bytes=16 << 10, stall_timeout_s=5)
FAST_HB = RuntimeSettings(heartbeat_s=0.2)


def file_digests(model_dir: Path) -> list[str]:
    m = read_manifest(model_dir)
    return [xxhash.xxh64((model_dir / b.file).read_bytes()).hexdigest() for b in m.blocks]


async def _setup(lc: LocalCluster, model_dir: Path, sources: list[int], receivers: list[int]):
    manifest = read_manifest(model_dir)
    for s in sources:
        await lc.cluster.request(s, HoldModel(req=0, model_dir=str(model_dir)))
    await prepare_receivers(lc.cluster, manifest, receivers)
    return manifest


async def _assert_full(lc: LocalCluster, model_dir: Path, nodes: list[int]) -> None:
    want = file_digests(model_dir)
    name = read_manifest(model_dir).name
    for n in nodes:
        st = await lc.cluster.request(n, GetStatus(req=0))
        assert st["models"][name] == list(range(16)), f"node {n} misses chunks"
        assert st["block_digests"][name] == want, f"node {n} holds bytes that differ from the files"


@pytest.mark.parametrize(
    "backend",
    ["tcp", pytest.param("nixl", marks=[pytest.mark.nixl, pytest.mark.skipif(
        importlib.util.find_spec("nixl") is None, reason="nixl is not installed (pip install 'lambdascale[nixl]')")])],
)
def test_binomial_multicast_delivers_every_byte(tiny_model: Path, backend: str) -> None:
    async def main() -> None:
        async with LocalCluster(4, TransferSettings(backend=backend), FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2, 3])
            res = await run_multicast(lc.cluster, manifest, [0], [1, 2, 3])
            assert set(res.node_full_s) == {1, 2, 3}
            assert all(len(res.arrivals[n]) == 16 for n in (1, 2, 3))
            assert res.bytes_moved == 3 * manifest.total_bytes  # each byte reaches each receiver once
            assert res.corrupt == res.resends == res.replans == 0
            assert res.plan_rounds == 16 - 1 + 2  # binomial meets the k - 1 + ceil(log2 n) bound
            await _assert_full(lc, tiny_model, [1, 2, 3])

    run_async(main())


def test_multicasts_of_two_models_run_side_by_side(tiny_model: Path, tmp_path: Path) -> None:
    """Two models spread at once, from different sources over the same receivers: each multicast
    reads its own queue of the cluster's events, so neither takes the other's chunk reports."""
    from lambdascale.model.importers import import_model

    other = import_model("synthetic:tiny-llama", tmp_path, name="tiny-b", n_blocks=8, chunks_per_block=2, seed=1).dir

    async def main() -> None:
        async with LocalCluster(4, SLOW, FAST_HB) as lc:
            ma = await _setup(lc, tiny_model, [0], [2, 3])
            mb = await _setup(lc, other, [1], [2, 3])
            ra, rb = await asyncio.gather(run_multicast(lc.cluster, ma, [0], [2, 3], timeout_s=30),
                                          run_multicast(lc.cluster, mb, [1], [2, 3], timeout_s=30))
            for res, m in ((ra, ma), (rb, mb)):
                assert set(res.node_full_s) == {2, 3} and res.bytes_moved == 2 * m.total_bytes
            await _assert_full(lc, tiny_model, [2, 3])
            await _assert_full(lc, other, [2, 3])
            assert not lc.cluster._subscribers  # each multicast closed its queue

    run_async(main())


def test_multicasts_of_one_model_from_a_shared_source_keep_their_sends_apart(tiny_model: Path) -> None:
    """Two scale-outs of one model at once, both fed by node 0. A receiver of the first dies: the
    first re-plans and cancels its own send lists on node 0, and the second runs on without a
    re-plan. A later scale-out of the model, after that cancellation, is not taken for cancelled."""
    async def main() -> None:
        async with LocalCluster(6, SLOW, FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2, 3, 4])
            killed: list[int] = []

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, ChunkHeld) and not killed and sum(len(prog.holdings[r]) for r in (1, 2)) >= 4:
                    killed.append(2)
                    lc.launcher.kill(2)

            ra, rb = await asyncio.gather(
                run_multicast(lc.cluster, manifest, [0], [1, 2], on_event=hook, timeout_s=30),
                run_multicast(lc.cluster, manifest, [0], [3, 4], timeout_s=30))
            assert killed == [2] and ra.lost == (2,) and ra.replans == 1 and set(ra.node_full_s) == {1}
            assert rb.replans == 0 and rb.lost == () and set(rb.node_full_s) == {3, 4}
            assert rb.bytes_moved == 2 * manifest.total_bytes
            await prepare_receivers(lc.cluster, manifest, [5])
            rc = await run_multicast(lc.cluster, manifest, [0], [5], timeout_s=30)
            assert set(rc.node_full_s) == {5}
            await _assert_full(lc, tiny_model, [1, 3, 4, 5])

    run_async(main())


def test_corrupted_chunks_are_caught_refetched_and_never_forwarded(tiny_model: Path) -> None:
    async def main() -> None:
        async with LocalCluster(4, TransferSettings(), FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2, 3])
            # chunk 0 is the first the source emits: node 1 gets it corrupted and must not pass it on
            await lc.cluster.request(1, CorruptNext(req=0, model=manifest.name, chunk=0))
            await lc.cluster.request(3, CorruptNext(req=0, model=manifest.name, chunk=9))
            held_from: dict[tuple[int, int], int] = {}

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, ChunkHeld):
                    held_from[(ev.node, ev.chunk)] = ev.src

            res = await run_multicast(lc.cluster, manifest, [0], [1, 2, 3], on_event=hook)
            assert res.corrupt == 2 and res.resends >= 2
            await _assert_full(lc, tiny_model, [1, 2, 3])

    run_async(main())


def test_receiver_killed_mid_multicast_survivors_complete(tiny_model: Path) -> None:
    async def main() -> None:
        async with LocalCluster(4, SLOW, FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2, 3])
            killed: list[int] = []

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, ChunkHeld) and not killed and sum(map(len, prog.holdings.values())) >= 16 + 4:
                    killed.append(2)
                    lc.launcher.kill(2)

            res = await run_multicast(lc.cluster, manifest, [0], [1, 2, 3], on_event=hook, timeout_s=30)
            assert killed == [2] and res.lost == (2,) and res.replans == 1
            assert set(res.node_full_s) == {1, 3}
            await _assert_full(lc, tiny_model, [1, 3])

    run_async(main())


def test_receiver_dead_before_the_multicast_starts_counts_as_lost(tiny_model: Path) -> None:
    """Its NodeLost went out before the multicast listened: the multicast still plans around it
    at once (no waiting for chunks it will never report)."""
    async def main() -> None:
        async with LocalCluster(4, SLOW, FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2, 3])
            with lc.cluster.subscribe() as events:
                lc.launcher.kill(3)
                while not isinstance(ev := await events.get(), NodeLost):
                    pass
            assert ev.node == 3 and 3 not in lc.cluster.alive()
            res = await run_multicast(lc.cluster, manifest, [0], [1, 2, 3], timeout_s=20)
            assert res.lost == (3,) and set(res.node_full_s) == {1, 2}
            await _assert_full(lc, tiny_model, [1, 2])

    run_async(main())


def test_source_killed_mid_multicast_other_holders_take_over(tiny_model: Path) -> None:
    async def main() -> None:
        async with LocalCluster(5, SLOW, FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0, 1], [2, 3, 4])
            seen_lost: list[int] = []

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, NodeLost):
                    seen_lost.append(ev.node)
                elif isinstance(ev, ChunkHeld) and not seen_lost and 0 not in prog.lost and \
                        sum(len(prog.holdings[r]) for r in (2, 3, 4)) >= 6:
                    lc.launcher.kill(0)

            res = await run_multicast(lc.cluster, manifest, [0, 1], [2, 3, 4], on_event=hook, timeout_s=30)
            assert seen_lost == [0] and res.lost == (0,)
            assert set(res.node_full_s) == {2, 3, 4}
            await _assert_full(lc, tiny_model, [1, 2, 3, 4])

    run_async(main())


def test_all_holders_of_a_chunk_lost_is_a_clear_error(tiny_model: Path) -> None:
    from lambdascale.errors import TransferError

    async def main() -> None:
        async with LocalCluster(3, SLOW, FAST_HB) as lc:
            manifest = await _setup(lc, tiny_model, [0], [1, 2])

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, ChunkHeld) and 0 not in prog.lost and sum(len(prog.holdings[r]) for r in (1, 2)) >= 2:
                    lc.launcher.kill(0)

            with pytest.raises(TransferError, match=r"held by no surviving node"):
                await run_multicast(lc.cluster, manifest, [0], [1, 2], on_event=hook, timeout_s=30)

    run_async(main())


@pytest.mark.parametrize("sources", [1, 2])
def test_send_lists_pace_each_node_by_its_previous_receive(sources: int) -> None:
    """Pure: every real send of round t (by a receiver) comes after a pacing entry naming the
    chunk that node received in its latest earlier round, so no node forwards into a peer that is
    still taking its on-time chunk; without pacing the lists are the plan's sends only."""
    from lambdascale.pipe.multicast import plan_multicast
    from lambdascale.runtime.multicast import PACE, node_send_lists

    plan = plan_multicast("binomial", 6, sources, 8, 16)
    ids = [10 + i for i in range(6)]
    plain = node_send_lists(plan, ids, pace=False)
    paced = node_send_lists(plan, ids)
    assert all(d != PACE for lst in plain.values() for _, d in lst)
    for node, lst in paced.items():
        assert [e for e in lst if e[1] != PACE] == plain[node]
    # replay: walk rounds; at each real send, the node's latest pacing entry is its last receive
    last_recv: dict[int, int] = {}
    pos = {n: 0 for n in paced}
    for rnd in plan.rounds:
        for s in rnd:
            src, lst = ids[s.src], paced[ids[s.src]]
            want = last_recv.get(src)
            marks = [c for c, d in lst[: pos[src]] if d == PACE]
            while lst[pos[src]][1] == PACE:
                marks.append(lst[pos[src]][0])
                pos[src] += 1
            assert lst[pos[src]] == (s.chunk, ids[s.dst])
            pos[src] += 1
            assert (marks[-1] if marks else None) == want, f"round send {s} not paced by {want}"
        for s in rnd:
            last_recv[ids[s.dst]] = s.chunk
    assert all(d != PACE for n in plan.sources for _, d in paced.get(ids[n], []))  # sources never wait
