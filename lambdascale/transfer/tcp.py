"""TCP backend: asyncio ``loop.sock_sendall`` / ``loop.sock_recv_into`` on raw non-blocking sockets
(through :mod:`lambdascale.transfer.conn`, which adds optional mutual TLS under the same calls).

Why raw sockets: ``StreamWriter.write`` copies into its own buffer and is several times slower
for bulk data. Here the sender hands memoryview slices of its registered buffer to the kernel and
the receiver reads straight into the destination slice of its registered buffer: no copies of
block bytes in user space.

Wire format per transfer (one sender -> one receiver connection, one transfer at a time):
``HEADER`` (magic, src node, offset, length, len(name), len(tag)) + name + tag + ``length`` raw
bytes; the receiver answers one status byte (0 = stored; otherwise an error frame: u32 length +
UTF-8 message) so the sender knows the bytes landed, and errors travel back with a reason.

Every connection opens with the cluster secret's challenge-response (:mod:`lambdascale.transfer.auth`,
channel kind ``transfer``) when the transport has a secret, as every agent's has: the listener
reads no header before the dialer has proved the secret, so an unauthenticated peer lands nothing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct

from lambdascale.errors import TransferError
from lambdascale.tasks import log_failure
from lambdascale.transfer.addresses import LOOPBACK, resolve
from lambdascale.transfer.auth import AuthError, Channel, client_handshake_sock, peer_name, server_handshake_sock
from lambdascale.transfer.base import Arrival, PeerInfo, Transport, TransportKind
from lambdascale.transfer.conn import Conn, SockConn, TlsConn

log = logging.getLogger(__name__)

_MAGIC = 0x4C534346  # "LSCF": a push (bytes follow the header)
_MAGIC_GET = 0x4C534347  # "LSCG": a fetch request (the receiver of the header sends the bytes back)
_HEADER = struct.Struct("!IiQQHH")  # magic, src, offset, length, name_len, tag_len
_OK = 0
_ERR = 1


async def _recv_exact(conn: Conn, view: memoryview) -> None:
    """Fill ``view`` completely from ``conn``; raise ``ConnectionError`` if the peer closes first."""
    got = 0
    n = len(view)
    while got < n:
        k = await conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k


async def _expect_ok(conn: Conn, stall: float, refusal: str) -> None:
    """Read the peer's one-byte status; on a refusal read its message and raise ``TransferError``
    as ``f"{refusal}: {message}"``."""
    status = bytearray(1)
    await asyncio.wait_for(_recv_exact(conn, memoryview(status)), stall)
    if status[0] != _OK:
        ln = bytearray(4)
        await asyncio.wait_for(_recv_exact(conn, memoryview(ln)), stall)
        msg = bytearray(struct.unpack("!I", ln)[0])
        await asyncio.wait_for(_recv_exact(conn, memoryview(msg)), stall)
        raise TransferError(f"{refusal}: {msg.decode()}")


def _peer_of(conn: socket.socket) -> str:
    try:
        return peer_name(conn.getpeername())
    except OSError:
        return "a peer that already left"


class TcpTransport(Transport):
    """Transport over TCP on raw sockets. ``info().port`` is the listening port."""

    kind = TransportKind.TCP

    def __init__(self, node: int, settings=None, host: str | None = None, *, secret: bytes | None = None,
                 tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> None:
        super().__init__(node, settings)
        # (server, client) contexts for mutual TLS under every connection (transfer.tls_*), or None
        self._tls = tls
        # the cluster secret (transfer/auth.py): every connection proves it both ways before a byte
        # lands; None = no handshake, for transports inside one process (tests, benchmarks) only
        self._secret = secret
        # the agent resolves transfer.bind/advertise to addresses (addresses.bind_transport); a bare
        # transport (tests, benchmarks) listens on loopback
        self.host = host or resolve(self.settings.bind)
        self.advertised = self.settings.advertise or (self.host if self.host not in ("0.0.0.0", "::") else LOOPBACK)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        # outgoing connections by (peer, lane): lane 0 carries bulk sends and fetches, lane 1
        # urgent sends, so a pipeline's hidden states never queue behind a chunk to the same peer
        self._out: dict[tuple[int, int], Conn] = {}
        self._out_locks: dict[tuple[int, int], asyncio.Lock] = {}
        self._closed = False

    async def start(self) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.host, 0))
        lsock.listen(128)
        lsock.setblocking(False)
        self._listener = lsock
        log.info("node %d: tcp transport listening on %s:%d (advertised as %s; %s)", self.node, self.host,
                 lsock.getsockname()[1], self.advertised, "mutual TLS" if self._tls else "no TLS")
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        self._accept_task.add_done_callback(log_failure(f"node {self.node}: the transport's accept loop", log))

    def info(self) -> PeerInfo:
        if self._listener is None:
            raise TransferError(f"transport of node {self.node} is not started")
        return PeerInfo(node=self.node, backend=self.kind, host=self.advertised, port=self._listener.getsockname()[1])

    # ---- receiving -------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = loop.create_task(self._serve_sock(conn))
            self._conn_tasks.add(t)
            t.add_done_callback(self._conn_tasks.discard)
            t.add_done_callback(log_failure(f"node {self.node}: a transport connection's receiver", log))

    async def _serve_sock(self, sock: socket.socket) -> None:
        """TLS first where it is on (a peer that cannot complete it is logged and dropped), then the
        connection's transfers."""
        peer = _peer_of(sock)
        conn: Conn = SockConn(sock)
        if self._tls is not None:
            tls = TlsConn(sock, self._tls[0], server=True)
            try:
                await asyncio.wait_for(tls.handshake(), self.settings.connect_timeout_s)
            except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError) as e:
                log.warning("node %d: refused a transport connection from %s: TLS handshake failed (%s)",
                            self.node, peer, e.__class__.__name__ if isinstance(e, asyncio.TimeoutError) else e)
                sock.close()
                return
            conn = tls
        await self._serve_conn(conn, peer)

    async def _serve_conn(self, conn: Conn, peer: str) -> None:
        header = bytearray(_HEADER.size)
        stall = self.settings.stall_timeout_s
        slice_n = self.settings.io_slice_bytes
        try:
            if self._secret is not None:  # before any header is read: nothing lands unauthenticated
                try:
                    await server_handshake_sock(conn, self._secret, Channel.TRANSFER,
                                                self.settings.connect_timeout_s, peer)
                except AuthError as e:
                    log.warning("node %d: refused a transport connection: %s", self.node, e)
                    return
            while True:
                # Idle between transfers is fine: no timeout on the first header byte.
                k = await conn.recv_into(memoryview(header))
                if k == 0:
                    return
                await asyncio.wait_for(_recv_exact(conn, memoryview(header)[k:]), stall)
                magic, src, offset, length, name_len, tag_len = _HEADER.unpack(header)
                if magic == _MAGIC_GET:
                    if not await self._serve_fetch(conn, offset, length, name_len):
                        return
                    continue
                if magic != _MAGIC:
                    raise ConnectionError(f"bad frame magic {magic:#x} from a peer of node {self.node}")
                names = bytearray(name_len + tag_len)
                await asyncio.wait_for(_recv_exact(conn, memoryview(names)), stall)
                name = names[:name_len].decode()
                tag = names[name_len:].decode()
                arr = self._buffers.get(name)
                if arr is None or offset + length > arr.nbytes or length == 0:
                    why = (
                        f"no buffer {name!r} on node {self.node}"
                        if arr is None
                        else f"range [{offset}, {offset + length}) outside buffer {name!r} of {arr.nbytes} bytes on node {self.node}"
                    )
                    msg = why.encode()
                    await conn.sendall(bytes([_ERR]) + struct.pack("!I", len(msg)) + msg)
                    return  # the stream is out of sync now: drop the connection
                view = arr.data[offset : offset + length]
                pos = 0
                while pos < length:
                    n = min(slice_n, length - pos)
                    await self.recv_bucket.acquire_async(n)
                    await asyncio.wait_for(_recv_exact(conn, view[pos : pos + n]), stall)
                    pos += n
                self._on_received(Arrival(tag=tag, name=name, offset=offset, length=length, src=src))
                await conn.sendall(bytes([_OK]))
        except (ConnectionError, OSError, asyncio.TimeoutError):
            return  # the sender sees the failure on its side; a receiver has nothing to resend
        finally:
            conn.close()

    async def _serve_fetch(self, conn: Conn, offset: int, length: int, name_len: int) -> bool:
        """Answer a fetch: status byte, then the bytes (or an error frame). False = drop the connection."""
        stall = self.settings.stall_timeout_s
        nb = bytearray(name_len)
        await asyncio.wait_for(_recv_exact(conn, memoryview(nb)), stall)
        name = nb.decode()
        arr = self._buffers.get(name)
        if arr is None or length == 0 or offset + length > arr.nbytes:
            why = (f"no buffer {name!r} on node {self.node}" if arr is None else
                   f"range [{offset}, {offset + length}) outside buffer {name!r} of {arr.nbytes} bytes on node {self.node}")
            msg = why.encode()
            await conn.sendall(bytes([_ERR]) + struct.pack("!I", len(msg)) + msg)
            return True  # the request was fully read: the stream is still in sync
        await conn.sendall(bytes([_OK]))
        view = arr.data[offset : offset + length]
        pos = 0
        while pos < length:
            n = min(self.settings.io_slice_bytes, length - pos)
            await self.send_bucket.acquire_async(n)
            await asyncio.wait_for(conn.sendall(view[pos : pos + n]), stall)
            pos += n
        self.bytes_sent += length
        return True

    async def fetch(self, peer: int, name: str, offset: int, length: int) -> None:
        if self._closed:
            raise TransferError(f"transport of node {self.node} is closed")
        info = self._peer(peer)
        dst = self.buffer(name)
        self._check_range(name, offset, length, len(dst), f"fetching node {self.node}")
        stall = self.settings.stall_timeout_s
        where = f"node {self.node} <- node {peer} ({info.host}:{info.port}), buffer {name!r}"
        lock = self._out_locks.setdefault((peer, 0), asyncio.Lock())
        async with lock:
            sock = await self._out_sock(peer, info, 0)
            try:
                nb = name.encode()
                await asyncio.wait_for(sock.sendall(_HEADER.pack(_MAGIC_GET, self.node, offset, length, len(nb), 0) + nb), stall)
                await _expect_ok(sock, stall, f"{where}: peer refused the fetch")
                pos = 0
                while pos < length:
                    n = min(self.settings.io_slice_bytes, length - pos)
                    await self.recv_bucket.acquire_async(n)
                    await asyncio.wait_for(_recv_exact(sock, dst[offset + pos : offset + pos + n]), stall)
                    pos += n
            except TransferError:
                raise
            except asyncio.TimeoutError:
                self._drop_out(peer, sock, 0)
                raise TransferError(f"{where}: peer stalled, no progress for {stall}s (transfer.stall_timeout_s)") from None
            except (ConnectionError, OSError) as e:
                self._drop_out(peer, sock, 0)
                raise TransferError(f"{where}: connection lost: {e}") from None
            except BaseException:
                self._drop_out(peer, sock, 0)
                raise
        self.bytes_received += length

    # ---- sending ---------------------------------------------------------------------------
    async def _out_sock(self, peer: int, info: PeerInfo, lane: int) -> Conn:
        """The outgoing connection to ``peer`` on ``lane`` (0: sends and fetches; 1: urgent sends),
        opened on first use. The caller holds that lane's lock in ``_out_locks``."""
        sock = self._out.get((peer, lane))
        if sock is None:
            sock = self._out[(peer, lane)] = await self._connect(info)
        return sock

    def _drop_out(self, peer: int, sock: Conn, lane: int) -> None:
        """Forget and close a connection that failed mid-transfer; the next use reconnects."""
        self._out.pop((peer, lane), None)
        sock.close()

    async def _connect(self, peer: PeerInfo) -> Conn:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (peer.host, peer.port)), self.settings.connect_timeout_s)
        except asyncio.TimeoutError:
            sock.close()
            raise TransferError(
                f"node {self.node}: connecting to node {peer.node} at {peer.host}:{peer.port} timed out "
                f"after {self.settings.connect_timeout_s}s (transfer.connect_timeout_s)"
            ) from None
        except OSError as e:
            sock.close()
            reason = "connection refused" if e.errno == errno.ECONNREFUSED else (e.strerror or str(e))
            raise TransferError(
                f"node {self.node}: cannot connect to node {peer.node} at {peer.host}:{peer.port}: {reason}"
            ) from None
        conn: Conn = SockConn(sock)
        if self._tls is not None:
            tls = TlsConn(sock, self._tls[1], server=False)
            try:
                await asyncio.wait_for(tls.handshake(), self.settings.connect_timeout_s)
            except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError) as e:
                sock.close()
                why = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e)
                log.warning("node %d: TLS handshake with node %d at %s:%d failed: %s", self.node, peer.node,
                            peer.host, peer.port, why)
                raise TransferError(f"node {self.node}: TLS handshake with node {peer.node} at "
                                    f"{peer.host}:{peer.port} failed: {why}") from None
            conn = tls
        if self._secret is not None:
            try:
                await client_handshake_sock(conn, self._secret, Channel.TRANSFER, self.settings.connect_timeout_s,
                                            f"node {peer.node} at {peer.host}:{peer.port}")
            except AuthError as e:
                sock.close()
                log.warning("node %d: %s", self.node, e)
                raise AuthError(f"node {self.node}: {e}") from None
            except BaseException:
                sock.close()
                raise
        return conn

    async def send(self, peer: int, name: str, offset: int, length: int, tag: str, urgent: bool = False) -> None:
        if self._closed:
            raise TransferError(f"transport of node {self.node} is closed")
        info = self._peer(peer)
        src_view = self.buffer(name)
        self._check_range(name, offset, length, len(src_view), f"sender node {self.node}")
        lane = 1 if urgent else 0
        lock = self._out_locks.setdefault((peer, lane), asyncio.Lock())
        async with lock:
            sock = await self._out_sock(peer, info, lane)
            try:
                await self._send_on(sock, info, src_view, name, offset, length, tag)
            except BaseException:
                self._drop_out(peer, sock, lane)
                raise
        self.bytes_sent += length

    async def _send_on(
        self, sock: Conn, info: PeerInfo, src_view: memoryview, name: str, offset: int, length: int, tag: str
    ) -> None:
        stall = self.settings.stall_timeout_s
        nb, tb = name.encode(), tag.encode()
        where = f"node {self.node} -> node {info.node} ({info.host}:{info.port}), tag {tag!r}"
        try:
            await asyncio.wait_for(
                sock.sendall(_HEADER.pack(_MAGIC, self.node, offset, length, len(nb), len(tb)) + nb + tb),
                stall,
            )
            pos = 0
            slice_n = self.settings.io_slice_bytes
            while pos < length:
                n = min(slice_n, length - pos)
                await self.send_bucket.acquire_async(n)
                await asyncio.wait_for(sock.sendall(src_view[offset + pos : offset + pos + n]), stall)
                pos += n
            await _expect_ok(sock, stall, f"{where}: receiver rejected the transfer")
        except asyncio.TimeoutError:
            raise TransferError(
                f"{where}: peer stalled, no progress for {stall}s (transfer.stall_timeout_s)"
            ) from None
        except (ConnectionError, OSError) as e:
            raise TransferError(f"{where}: connection lost: {e}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in [self._accept_task, *self._conn_tasks] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for s in self._out.values():
            s.close()
        self._out.clear()
