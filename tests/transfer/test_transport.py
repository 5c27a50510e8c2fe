"""One behavioural suite run against every Transport backend (tcp always; nixl when installed)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import time

import numpy as np
import pytest

from lambdascale.errors import TransferError
from lambdascale.transfer.base import Arrival, Transport, TransportKind
from lambdascale.transfer.factory import make_transport
from lambdascale.ratelimit import TokenBucket
from lambdascale.transfer.settings import TransferSettings
from lambdascale.clock import ManualClock

HAVE_NIXL = importlib.util.find_spec("nixl") is not None

BACKENDS = [
    "tcp",
    pytest.param(
        "nixl",
        marks=[
            pytest.mark.nixl,
            pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed (pip install 'lambdascale[nixl]')"),
        ],
    ),
]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _pair(kind: str, settings: TransferSettings | None = None, size: int = 1 << 20) -> tuple[Transport, Transport]:
    a = make_transport(kind, 0, settings)
    b = make_transport(kind, 1, settings)
    await a.start()
    await b.start()
    src = np.frombuffer(a.register("blk0", size), dtype=np.uint8)
    src[:] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    b.register("blk0", size)
    a.add_peer(b.info())
    b.add_peer(a.info())
    return a, b


@pytest.mark.parametrize("kind", BACKENDS)
def test_send_lands_in_same_range_and_reports_arrival(kind: str) -> None:
    async def main() -> None:
        a, b = await _pair(kind)
        try:
            await a.send(1, "blk0", 1000, 70000, "c7")
            arr: Arrival = await asyncio.wait_for(b.arrivals.get(), 5)
            assert arr == Arrival(tag="c7", name="blk0", offset=1000, length=70000, src=0)
            got = np.frombuffer(b.buffer("blk0"), dtype=np.uint8)
            want = np.frombuffer(a.buffer("blk0"), dtype=np.uint8)
            assert np.array_equal(got[1000:71000], want[1000:71000])
            assert not got[:1000].any() and not got[71000:].any()  # nothing outside the range
            assert a.bytes_sent == 70000 and b.bytes_received == 70000
        finally:
            await a.close()
            await b.close()

    run(main())


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_senders_fill_one_receiver(kind: str) -> None:
    async def main() -> None:
        size = 1 << 20
        ts = [make_transport(kind, i) for i in range(3)]
        for t in ts:
            await t.start()
        try:
            data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
            for t in ts[:2]:
                np.frombuffer(t.register("m", size), dtype=np.uint8)[:] = data
            ts[2].register("m", size)
            for t in ts:
                for u in ts:
                    if t is not u:
                        t.add_peer(u.info())
            half = size // 2
            # two chunks per sender, interleaved, all in flight at once
            q = size // 4
            await asyncio.gather(
                ts[0].send(2, "m", 0, q, "0"),
                ts[1].send(2, "m", q, q, "1"),
                ts[0].send(2, "m", half, q, "2"),
                ts[1].send(2, "m", half + q, q, "3"),
            )
            tags = sorted([(await ts[2].arrivals.get()).tag for _ in range(4)])
            assert tags == ["0", "1", "2", "3"]
            assert np.array_equal(np.frombuffer(ts[2].buffer("m"), dtype=np.uint8), data)
        finally:
            for t in ts:
                await t.close()

    run(main())


@pytest.mark.parametrize("kind", BACKENDS)
def test_bad_peer_buffer_and_range_raise_transfer_error(kind: str) -> None:
    async def main() -> None:
        a, b = await _pair(kind)
        try:
            with pytest.raises(TransferError, match="does not know peer node 9"):
                await a.send(9, "blk0", 0, 10, "x")
            with pytest.raises(TransferError, match="no buffer 'nope'"):
                await a.send(1, "nope", 0, 10, "x")
            with pytest.raises(TransferError, match=r"outside buffer 'blk0'"):
                await a.send(1, "blk0", (1 << 20) - 5, 10, "x")
            # the receiver's buffer is smaller than the sender's: rejected with a reason
            a.register("big", 4096)
            b.register("big", 1024)
            a.add_peer(b.info())
            with pytest.raises(TransferError, match=r"outside buffer 'big' of 1024 bytes"):
                await a.send(1, "big", 0, 4096, "y")
            # and the link still works afterwards
            await a.send(1, "blk0", 0, 100, "ok")
            assert (await asyncio.wait_for(b.arrivals.get(), 5)).tag == "ok"
        finally:
            await a.close()
            await b.close()

    run(main())


@pytest.mark.parametrize("kind", BACKENDS)
def test_rate_cap_bounds_throughput(kind: str) -> None:
    # 0.08 Gbit/s = 10 MB/s; 3 MB beyond the 256 KiB burst must take about 0.27 s
    settings = TransferSettings(link_gbps=0.08, io_slice_bytes=64 << 10, bucket_burst_bytes=256 << 10)

    async def main() -> None:
        a, b = await _pair(kind, settings, size=3 << 20)
        try:
            t0 = time.perf_counter()
            await a.send(1, "blk0", 0, 3 << 20, "r")
            await asyncio.wait_for(b.arrivals.get(), 10)
            dt = time.perf_counter() - t0
            expect = ((3 << 20) - (256 << 10)) / 10e6
            assert dt >= 0.9 * expect, (dt, expect)
            assert dt < 4 * expect + 0.5, (dt, expect)
        finally:
            await a.close()
            await b.close()

    run(main())


@pytest.mark.parametrize("kind", BACKENDS)
def test_corruption_hook_flips_a_received_byte(kind: str) -> None:
    async def main() -> None:
        a, b = await _pair(kind)
        try:
            b.corrupt_tags.add("bad")
            await a.send(1, "blk0", 10, 100, "bad")
            await asyncio.wait_for(b.arrivals.get(), 5)
            got = np.frombuffer(b.buffer("blk0"), dtype=np.uint8)[10:110]
            want = np.frombuffer(a.buffer("blk0"), dtype=np.uint8)[10:110]
            assert int((got != want).sum()) == 1
            await a.send(1, "blk0", 10, 100, "good")  # the hook fires once
            await asyncio.wait_for(b.arrivals.get(), 5)
            assert np.array_equal(np.frombuffer(b.buffer("blk0"), dtype=np.uint8)[10:110], want)
        finally:
            await a.close()
            await b.close()

    run(main())


@pytest.mark.parametrize("kind", BACKENDS)
def test_vanished_peer_gives_transfer_error_within_bound(kind: str) -> None:
    settings = TransferSettings(connect_timeout_s=1.0, stall_timeout_s=1.0)

    async def main() -> None:
        a, b = await _pair(kind, settings)
        try:
            await a.send(1, "blk0", 0, 1000, "first")
            await b.close()
            t0 = time.perf_counter()
            with pytest.raises(TransferError):
                for i in range(3):  # the first send may still be absorbed by socket buffers
                    await a.send(1, "blk0", 0, 1 << 20, f"after{i}")
            assert time.perf_counter() - t0 < 3 * (settings.stall_timeout_s + settings.connect_timeout_s) + 1
        finally:
            await a.close()
            await b.close()

    run(main())


def test_tcp_refused_connection_is_a_clear_error() -> None:
    async def main() -> None:
        a = make_transport("tcp", 0, TransferSettings(connect_timeout_s=1.0))
        await a.start()
        a.register("m", 100)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens on this port now
        from lambdascale.transfer.base import PeerInfo

        a.add_peer(PeerInfo(node=5, backend=TransportKind.TCP, port=port))
        t0 = time.perf_counter()
        with pytest.raises(TransferError, match=rf"node 5 at 127.0.0.1:{port}: connection refused"):
            await a.send(5, "m", 0, 100, "x")
        assert time.perf_counter() - t0 < 1.5
        await a.close()

    run(main())


def test_tcp_stalled_peer_times_out() -> None:
    """A peer that accepts but never reads: the send fails after stall_timeout_s, not never."""

    async def main() -> None:
        settings = TransferSettings(stall_timeout_s=0.5)
        a = make_transport("tcp", 0, settings)
        await a.start()
        size = 32 << 20  # far more than the kernel's socket buffers hold
        a.register("m", size)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        from lambdascale.transfer.base import PeerInfo

        a.add_peer(PeerInfo(node=3, backend=TransportKind.TCP, port=lsock.getsockname()[1]))
        t0 = time.perf_counter()
        try:
            with pytest.raises(TransferError, match=r"stalled, no progress for 0.5s"):
                await a.send(3, "m", 0, size, "s")
            assert time.perf_counter() - t0 < 3.0
        finally:
            lsock.close()
            await a.close()

    run(main())


def test_token_bucket_debt_math() -> None:
    clock = ManualClock()
    tb = TokenBucket(rate=1000.0, burst=100, clock=clock)
    assert tb.reserve(100) == 0.0  # the burst is free
    assert tb.reserve(500) == pytest.approx(0.5)  # then debt at 1000 B/s
    clock.advance(0.5)
    assert tb.reserve(0) == 0.0
    assert tb.reserve(1000) == pytest.approx(1.0)
    assert TokenBucket(None, 1).reserve(10**9) == 0.0
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBucket(0.0, 10)


def test_make_transport_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        make_transport("carrier-pigeon", 0)


@pytest.mark.parametrize("kind", BACKENDS)
def test_fetch_pulls_a_range_and_reports_bad_requests(kind: str) -> None:
    async def main() -> None:
        a, b = await _pair(kind)
        try:
            await b.fetch(0, "blk0", 4096, 50000)  # b pulls from a (one-sided on nixl)
            got = np.frombuffer(b.buffer("blk0"), dtype=np.uint8)
            want = np.frombuffer(a.buffer("blk0"), dtype=np.uint8)
            assert np.array_equal(got[4096:54096], want[4096:54096])
            assert not got[:4096].any() and not got[54096:].any()
            assert b.arrivals.empty()  # the caller knows; no arrival is queued
            a.register("small", 100)
            b.register("small", 1000)
            b.add_peer(a.info())
            with pytest.raises(TransferError, match=r"outside buffer 'small' of 100 bytes"):
                await b.fetch(0, "small", 0, 1000)
            await b.fetch(0, "blk0", 0, 10)  # the link still works
            assert np.array_equal(got[:10], want[:10])
        finally:
            await a.close()
            await b.close()

    run(main())


def test_one_token_bucket_serves_store_and_transport() -> None:
    """The store's SSD cap and the links use the same implementation (lambdascale.ratelimit)."""
    import lambdascale.ratelimit as shared
    import lambdascale.store.ratelimit as store_rl
    from lambdascale.transfer.factory import make_transport
    from lambdascale.transfer.settings import TransferSettings

    assert store_rl.TokenBucket is shared.TokenBucket
    t = make_transport("tcp", 0, TransferSettings(link_gbps=8.0))
    assert type(t.send_bucket) is shared.TokenBucket
    assert t.send_bucket.rate == pytest.approx(1e9)  # 8 Gbit/s = 1e9 bytes/s
    with pytest.raises(ValueError, match="negative"):
        t.send_bucket.reserve(-1)



@pytest.mark.parametrize("kind", BACKENDS)
def test_urgent_send_does_not_wait_behind_a_bulk_send(kind: str) -> None:
    """A pipeline's hidden states (``urgent``) to a peer that is receiving a chunk from us land
    before the chunk does, under a link cap: tcp gives them their own connection and nixl runs
    them beside the chunk's WRITEs, and the cap's bucket interleaves them with the chunk's slices
    (nixl too: a capped send goes in slices, so the bucket's debt is one slice, not the chunk)."""

    async def main() -> None:
        settings = TransferSettings(link_gbps=0.064, io_slice_bytes=64 << 10, bucket_burst_bytes=64 << 10)  # 8 MB/s
        a, b = await _pair(kind, settings, size=4 << 20)
        a.register("h", 4096)
        b.register("h", 4096)
        a.add_peer(b.info())  # one-sided backends learn the new buffer's address
        b.add_peer(a.info())
        try:
            bulk = asyncio.ensure_future(a.send(1, "blk0", 0, 4 << 20, "chunk"))  # ~0.5 s at the cap
            await asyncio.sleep(0)  # a yield: the bulk send now holds the bulk lane
            await a.send(1, "h", 0, 4096, "hidden", urgent=True)
            assert not bulk.done()
            first = await b.arrivals.get()
            await bulk
            second = await b.arrivals.get()
            assert (first.tag, second.tag) == ("hidden", "chunk")
            assert (first.name, first.length) == ("h", 4096)
        finally:
            await a.close()
            await b.close()

    run(main())
