"""One connection of the tcp transport: a raw non-blocking socket, optionally under TLS.

:class:`SockConn` is the fast path: ``loop.sock_recv_into`` / ``loop.sock_sendall`` straight
between the kernel and a registered buffer, no copy in user space. :class:`TlsConn` puts the
standard library's TLS (``ssl.SSLObject`` over two ``MemoryBIO``\\ s, since asyncio's socket
calls refuse an ``SSLSocket``) under the same three calls; encryption copies each byte once
anyway. Both are what :mod:`lambdascale.transfer.tcp` and the secret's handshake
(:mod:`lambdascale.transfer.auth`) read and write through.

TLS settings (``transfer.tls_cert``, ``tls_key``, ``tls_ca``) make it mutual: every node presents
the cluster's certificate and accepts only peers whose certificate the cluster CA signed. Host
names are not checked: nodes dial each other by address, and which *cluster* a peer belongs to
is what the CA (and, on top, the secret's handshake) proves.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Protocol

from lambdascale.errors import LambdaScaleError

_TLS_READ = 256 << 10  # bytes asked of the kernel per read under TLS


class Conn(Protocol):
    async def recv_into(self, view: memoryview) -> int: ...

    async def sendall(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


class SockConn:
    """A connected non-blocking socket, read and written by the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview) -> int:
        return await self._loop.sock_recv_into(self.sock, view)

    async def sendall(self, data: bytes | memoryview) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


class TlsConn:
    """TLS over a connected non-blocking socket (``ssl.SSLObject`` and memory BIOs)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self._loop.sock_recv(self.sock, _TLS_READ)
        if not data:
            self._in.write_eof()
        else:
            self._in.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self._tls.read(len(view), view)
            except ssl.SSLWantReadError:
                await self._flush()  # TLS 1.3 may have to answer (key updates, tickets)
                await self._fill()
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLEOFError:
                return 0

    async def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self._tls.write(view)
            view = view[n:]
            await self._flush()

    def close(self) -> None:
        self.sock.close()


def tls_contexts(cert: str | None, key: str | None, ca: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """(server context, client context) for mutual TLS from certificate files, or None when TLS is
    off (all three unset). A clear error names a missing or unreadable file."""
    given = {"tls_cert": cert, "tls_key": key, "tls_ca": ca}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise LambdaScaleError(f"TLS needs transfer.tls_cert, tls_key and tls_ca together; missing: {', '.join(missing)}")
    for k, v in given.items():
        if not Path(str(v)).is_file():
            raise LambdaScaleError(f"transfer.{k}: no such file {v}")
    out = []
    for purpose, side in ((ssl.Purpose.CLIENT_AUTH, "server"), (ssl.Purpose.SERVER_AUTH, "client")):
        ctx = ssl.create_default_context(purpose, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # peers are dialled by address; the CA says they are the cluster's
        ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a server asks for the client's certificate too
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as e:
            raise LambdaScaleError(f"transfer.tls_cert / tls_key ({cert}, {key}) do not load as a {side} "
                                   f"certificate and its key: {e}") from None
        out.append(ctx)
    return out[0], out[1]
