"""Point-to-point Transport throughput over 127.0.0.1, receiver in a second process.

Prints one table row per backend (tcp, and nixl when installed): bytes moved, seconds, GB/s.
Each transfer is one ``send`` of ``--chunk-mib`` MiB (sender side returns once the receiver holds
the bytes); ``--total-mib`` of them are sent back to back, as a multicast sender would.

    .venv/bin/python bench/bench_transport.py --total-mib 512 --chunk-mib 16
    .venv/bin/python bench/bench_transport.py --busy-sender --switch-interval-ms 5,0.5 --link-gbps 4

``--busy-sender`` adds the other half of a serving node to the sender: a thread that steps a small
model the way an engine drives a GPU (many short torch calls with Python between them, so the
thread holds the interpreter lock most of the time), as an agent's engine thread does while its
event loop sends chunks. Each ``--switch-interval-ms`` value is a ``sys.setswitchinterval`` in the
sender (CPython's default is 5 ms): how long that thread may keep the lock from the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import sys
import threading
import time

from lambdascale.transfer.factory import make_transport
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


def _engine_like(stop: threading.Event, steps: list[int]) -> None:
    """Step a 24-layer toy model of short torch calls until ``stop``: Python-bound, like a GPU engine."""
    import torch

    ws = [torch.randn(64, 64) * 0.1 for _ in range(24)]
    x = torch.randn(4, 64)
    while not stop.is_set():
        for w in ws:
            x = torch.tanh(x @ w) + x * 0.5
        x = x / (x.norm() + 1.0)
        steps[0] += 1


async def _sender(kind: str, total: int, chunk: int, link_gbps: float | None = None,
                  busy: bool = False) -> tuple[float, float]:
    """(bytes/s moved, engine steps/s while it moved them; 0 without the engine thread)."""
    from lambdascale.transfer.base import PeerInfo

    n = total // chunk
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(kind, chunk, n, child))
    proc.start()
    try:
        t = make_transport(kind, 0, TransferSettings(io_slice_bytes=4 << 20, link_gbps=link_gbps))
        await t.start()
        t.register("buf", chunk)
        peer = PeerInfo.model_validate_json(await asyncio.to_thread(parent.recv))
        t.add_peer(peer)
        parent.send(t.info().model_dump_json())
        await t.send(1, "buf", 0, chunk, "warm")  # connection set-up outside the timing
        stop, steps = threading.Event(), [0]
        engine = threading.Thread(target=_engine_like, args=(stop, steps), daemon=True) if busy else None
        if engine:
            engine.start()
        t0 = time.perf_counter()
        try:
            for i in range(n - 1):
                await t.send(1, "buf", 0, chunk, str(i))
            dt = time.perf_counter() - t0
        finally:
            stop.set()
            if engine:
                engine.join()
        assert await asyncio.to_thread(parent.recv) == "done"
        parent.send("bye")
        await t.close()
        return (n - 1) * chunk / dt, steps[0] / dt
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--chunk-mib", type=int, default=16)
    ap.add_argument("--link-gbps", type=float, default=None, help="cap the sender's link (token bucket)")
    ap.add_argument("--busy-sender", action="store_true",
                    help="also measure with an engine-like Python-bound thread in the sender")
    ap.add_argument("--switch-interval-ms", default="5",
                    help="comma list of sys.setswitchinterval values (ms) to measure the busy sender with")
    args = ap.parse_args()
    kinds = ["tcp"] + (["nixl"] if importlib.util.find_spec("nixl") else [])
    runs = [(False, 5.0)] + ([(True, float(v)) for v in args.switch_interval_ms.split(",")] if args.busy_sender else [])
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} UTC; link {args.link_gbps or 'uncapped'} Gbit/s")
    print(f"{'backend':8} {'moved MiB':>10} {'chunk MiB':>10} {'sender':>22} {'GB/s':>7} {'engine steps/s':>14}")
    for kind in kinds:
        for busy, interval_ms in runs:
            sys.setswitchinterval(interval_ms / 1e3)
            bps, sps = asyncio.run(_sender(kind, args.total_mib << 20, args.chunk_mib << 20, args.link_gbps, busy))
            who = f"engine thread, {interval_ms:g} ms" if busy else "idle"
            print(f"{kind:8} {args.total_mib:>10} {args.chunk_mib:>10} {who:>22} {bps / 1e9:>7.2f} "
                  f"{sps if busy else float('nan'):>14.0f}", flush=True)
    if "nixl" not in kinds:
        print("nixl: not installed (pip install 'lambdascale[nixl]')")


if __name__ == "__main__":
    main()
