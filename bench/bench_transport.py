"""Point-to-point Transport throughput over 127.0.0.1, receiver in a second process.

Prints one table row per backend (tcp, and nixl when installed): bytes moved, seconds, GB/s.
Each transfer is one ``send`` of ``--chunk-mib`` MiB (sender side returns once the receiver holds
the bytes); ``--total-mib`` of them are sent back to back, as a multicast sender would.

    .venv/bin/python bench/bench_transport.py --total-mib 512 --chunk-mib 16
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import time

from lambdascale.transfer.base import make_transport
from lambdascale.transfer.settings import TransferSettings


def _receiver(kind: str, size: int, n: int, conn) -> None:
    async def main() -> None:
        t = make_transport(kind, 1, TransferSettings(io_slice_bytes=4 << 20))
        await t.start()
        t.register("buf", size)
        conn.send(t.info().model_dump_json())
        peer_json = conn.recv()
        from lambdascale.transfer.base import PeerInfo

        t.add_peer(PeerInfo.model_validate_json(peer_json))
        for _ in range(n):
            await t.arrivals.get()
        conn.send("done")
        conn.recv()  # wait for the sender to finish before closing
        await t.close()

    asyncio.run(main())


async def _sender(kind: str, total: int, chunk: int) -> float:
    from lambdascale.transfer.base import PeerInfo

    n = total // chunk
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(kind, chunk, n, child))
    proc.start()
    try:
        t = make_transport(kind, 0, TransferSettings(io_slice_bytes=4 << 20))
        await t.start()
        t.register("buf", chunk)
        peer = PeerInfo.model_validate_json(await asyncio.to_thread(parent.recv))
        t.add_peer(peer)
        parent.send(t.info().model_dump_json())
        await t.send(1, "buf", 0, chunk, "warm")  # connection set-up outside the timing
        t0 = time.perf_counter()
        for i in range(n - 1):
            await t.send(1, "buf", 0, chunk, str(i))
        dt = time.perf_counter() - t0
        assert await asyncio.to_thread(parent.recv) == "done"
        parent.send("bye")
        await t.close()
        return (n - 1) * chunk / dt
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--chunk-mib", type=int, default=16)
    args = ap.parse_args()
    kinds = ["tcp"] + (["nixl"] if importlib.util.find_spec("nixl") else [])
    print(f"{'backend':8} {'moved MiB':>10} {'chunk MiB':>10} {'GB/s':>7}")
    for kind in kinds:
        bps = asyncio.run(_sender(kind, args.total_mib << 20, args.chunk_mib << 20))
        print(f"{kind:8} {args.total_mib:>10} {args.chunk_mib:>10} {bps / 1e9:>7.2f}")
    if "nixl" not in kinds:
        print("nixl: not installed (pip install 'lambdascale[nixl]')")


if __name__ == "__main__":
    main()
