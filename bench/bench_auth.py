"""What the cluster secret's handshake (transfer/auth.py) costs one connection.

Times ``--n`` handshakes, each on a fresh socketpair (both ends in this process and event loop,
so two round trips through the kernel but no network latency), and, for comparison, a fresh TCP
connection to 127.0.0.1 with and without the handshake. On a real network add two round trips
per connection; the tcp transport opens one connection per peer and lane and keeps it, the
control channel one per agent, so this is paid once per pair, not per transfer.

    .venv/bin/python bench/bench_auth.py --n 1000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

from lambdascale.transfer.auth import Channel, client_handshake_sock, new_secret, server_handshake_sock

SECRET = new_secret()


async def _pair_handshake() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        await asyncio.gather(client_handshake_sock(a, SECRET, Channel.TRANSFER, 5.0, "s"),
                             server_handshake_sock(b, SECRET, Channel.TRANSFER, 5.0, "c"))
    finally:
        a.close()
        b.close()


async def _tcp(n: int, handshake: bool) -> float:
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    lsock.setblocking(False)
    addr = lsock.getsockname()
    t0 = time.perf_counter()
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        await loop.sock_connect(c, addr)
        s, _ = await loop.sock_accept(lsock)
        s.setblocking(False)
        if handshake:
            await asyncio.gather(client_handshake_sock(c, SECRET, Channel.TRANSFER, 5.0, "s"),
                                 server_handshake_sock(s, SECRET, Channel.TRANSFER, 5.0, "c"))
        c.close()
        s.close()
    dt = time.perf_counter() - t0
    lsock.close()
    return dt


async def main(n: int) -> None:
    t0 = time.perf_counter()
    for _ in range(n):
        await _pair_handshake()
    pair = time.perf_counter() - t0
    plain = await _tcp(n, False)
    authed = await _tcp(n, True)
    print(f"{'case':<34} {'per connection':>15}")
    print(f"{'socketpair + handshake':<34} {pair / n * 1e6:>12.1f} us")
    print(f"{'tcp 127.0.0.1 connect':<34} {plain / n * 1e6:>12.1f} us")
    print(f"{'tcp 127.0.0.1 connect + handshake':<34} {authed / n * 1e6:>12.1f} us")
    print(f"handshake adds {(authed - plain) / n * 1e6:.1f} us per tcp connection ({n} connections)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="connections per case")
    asyncio.run(main(p.parse_args().n))
