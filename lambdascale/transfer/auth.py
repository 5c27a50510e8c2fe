"""The cluster secret and the mutual challenge-response every cluster channel opens with.

Both of the cluster's own channels (the control channel, agent -> controller, and the tcp
transport's connections, agent -> agent) start with this handshake before any message is read
or any byte lands in a buffer. The connecting side is the *client*, the listening side the
*server*; each proves it holds the cluster secret without sending it::

    client -> server   HELLO   magic "LSAH", version, channel kind, 32-byte nonce Nc
    server -> client   0 + HELLO (its own fresh nonce Ns)     | or 1 (refused: not our hello)
    client -> server   PROOF   HMAC-SHA256(secret, "C" || Nc || Ns || kind)
    server -> client   0 + HMAC-SHA256(secret, "S" || Ns || Nc || kind)   | or 2 (refused: wrong proof)

Why it holds: a proof covers both nonces, and each side draws its nonce fresh for every
connection, so a recorded handshake replayed on a new connection meets a new nonce and its proof
is wrong; the role byte makes a server's proof useless as a client's (no reflection); the kind
byte keeps a control-channel proof from opening a transport connection. The server verifies the
client before it proves anything itself, so a client without the secret gets one nonce and a
refusal, nothing else. Proofs are compared with :func:`hmac.compare_digest`. The whole handshake
runs under one timeout. Failures raise :class:`AuthError`, whose message names the peer's address
and what went wrong, never the secret.

Two variants share one implementation: asyncio streams (the control channel) and a raw
non-blocking socket (the tcp transport, ``loop.sock_recv_into`` / ``loop.sock_sendall``).

The secret: at least :data:`MIN_SECRET_BYTES` random bytes, made fresh per cluster start
(:func:`new_secret`) or read from a file of hex that only its owner may read
(:func:`read_secret_file`, ``runtime.secret_file``). Launchers hand it to agents in the
environment variable :data:`SECRET_ENV` (hex), never on a command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from lambdascale.errors import LambdaScaleError, TransferError

if TYPE_CHECKING:
    from lambdascale.transfer.conn import Conn

SECRET_ENV = "LAMBDASCALE_CLUSTER_SECRET"
MIN_SECRET_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size  # 32

_MAGIC = b"LSAH"
_VERSION = 1
_HELLO = struct.Struct(f"!4sBB{NONCE_BYTES}s")  # magic, version, channel kind, nonce: 38 bytes
_OK = 0
_REFUSED_HELLO = 1  # not a lambdascale hello, another version, or another channel kind
_REFUSED_PROOF = 2  # the client's proof is wrong: it does not hold this cluster's secret
_ROLE_CLIENT = b"C"
_ROLE_SERVER = b"S"


class AuthError(TransferError):
    """A channel's handshake failed: the peer does not hold the cluster secret, or is no
    lambdascale peer, or went silent. The message names the peer's address, never the secret."""


class Channel(str, Enum):
    """Which channel a handshake opens; bound into every proof."""

    CONTROL = "control"
    TRANSFER = "transfer"


_CHANNEL_CODE = {Channel.CONTROL: 1, Channel.TRANSFER: 2}


# ---- the secret ----------------------------------------------------------------------------
def new_secret() -> bytes:
    """A fresh random cluster secret (:data:`MIN_SECRET_BYTES` bytes)."""
    return secrets.token_bytes(MIN_SECRET_BYTES)


def parse_secret(text: str, source: str) -> bytes:
    """The secret from its hex form; ``LambdaScaleError`` naming ``source`` (never the text) if bad."""
    text = text.strip()
    if not text:
        raise LambdaScaleError(f"{source} is empty: it must hold the cluster secret as hex")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise LambdaScaleError(f"{source} is not hex: it must hold the cluster secret as hex digits") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise LambdaScaleError(
            f"{source} holds a {len(secret)}-byte secret; at least {MIN_SECRET_BYTES} bytes "
            f"({2 * MIN_SECRET_BYTES} hex digits) are needed"
        )
    return secret


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path`` (hex). The file must exist, be non-empty and be readable by its owner
    only (mode 0600 or stricter): a group- or world-readable secret is refused, not used."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except FileNotFoundError:
        raise LambdaScaleError(f"cluster secret file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LambdaScaleError(f"cannot read cluster secret file {str(p)!r}: {e}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LambdaScaleError(
            f"cluster secret file {str(p)!r} has mode {mode:04o}: others than its owner may read it; "
            f"chmod 600 {str(p)!r}"
        )
    return parse_secret(text, f"cluster secret file {str(p)!r}")


def load_secret(path: str | os.PathLike[str] | None) -> bytes:
    """``runtime.secret_file``: the secret in ``path``, or a fresh one when ``path`` is None."""
    return new_secret() if path is None else read_secret_file(path)


def write_secret_file(path: str | os.PathLike[str], secret: bytes) -> None:
    """Write ``secret`` as hex to ``path``, created with mode 0600 (an existing file is replaced)."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.hex().encode() + b"\n")
    finally:
        os.close(fd)


def take_secret_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    """The secret in :data:`SECRET_ENV`, removed from the environment so children do not inherit
    it; None when the variable is not set."""
    env = os.environ if environ is None else environ
    text = env.pop(SECRET_ENV, None)
    return None if text is None else parse_secret(text, f"environment variable {SECRET_ENV}")


# ---- the handshake -------------------------------------------------------------------------
def _proof(secret: bytes, role: bytes, own: bytes, peer: bytes, channel: Channel) -> bytes:
    msg = role + own + peer + bytes([_VERSION, _CHANNEL_CODE[channel]])
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _hello(nonce: bytes, channel: Channel) -> bytes:
    return _HELLO.pack(_MAGIC, _VERSION, _CHANNEL_CODE[channel], nonce)


def _hello_fault(frame: bytes, channel: Channel) -> str | None:
    """Why ``frame`` is not a hello for ``channel`` (None when it is)."""
    magic, version, code, _ = _HELLO.unpack(frame)
    if magic != _MAGIC:
        return "its first bytes are no lambdascale handshake"
    if version != _VERSION:
        return f"it speaks handshake version {version}, this process {_VERSION}"
    if code != _CHANNEL_CODE[channel]:
        return f"it opened another kind of channel (code {code}) where a {channel.value} channel was expected"
    return None


Recv = Callable[[int], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


async def _client(recv: Recv, send: Send, secret: bytes, channel: Channel, peer: str) -> None:
    nonce = secrets.token_bytes(NONCE_BYTES)
    await send(_hello(nonce, channel))
    status = (await recv(1))[0]
    if status == _REFUSED_HELLO:
        raise AuthError(
            f"{channel.value} channel to {peer}: the peer refused the handshake (another version or channel kind)"
        )
    if status != _OK:
        raise AuthError(f"{channel.value} channel to {peer}: unexpected handshake status {status}")
    frame = await recv(_HELLO.size)
    fault = _hello_fault(frame, channel)
    if fault is not None:
        raise AuthError(f"{channel.value} channel to {peer}: {fault}")
    peer_nonce = frame[-NONCE_BYTES:]
    if hmac.compare_digest(peer_nonce, nonce):
        raise AuthError(f"{channel.value} channel to {peer}: the peer echoed this side's nonce")
    await send(_proof(secret, _ROLE_CLIENT, nonce, peer_nonce, channel))
    status = (await recv(1))[0]
    if status == _REFUSED_PROOF:
        raise AuthError(
            f"{channel.value} channel to {peer}: the peer refused this process's proof: "
            f"the two hold different cluster secrets ({SECRET_ENV} / runtime.secret_file)"
        )
    if status != _OK:
        raise AuthError(f"{channel.value} channel to {peer}: unexpected handshake status {status}")
    theirs = await recv(PROOF_BYTES)
    if not hmac.compare_digest(theirs, _proof(secret, _ROLE_SERVER, peer_nonce, nonce, channel)):
        raise AuthError(f"{channel.value} channel to {peer}: the peer does not hold the cluster secret")


async def _refuse(send: Send, code: int) -> None:
    """Tell the client why it is refused; it may be gone already, which changes nothing."""
    try:
        await send(bytes([code]))
    except (ConnectionError, OSError):
        pass


async def _server(recv: Recv, send: Send, secret: bytes, channel: Channel, peer: str) -> None:
    frame = await recv(_HELLO.size)
    fault = _hello_fault(frame, channel)
    if fault is not None:
        await _refuse(send, _REFUSED_HELLO)
        raise AuthError(f"{channel.value} channel from {peer} refused: {fault}")
    peer_nonce = frame[-NONCE_BYTES:]
    nonce = secrets.token_bytes(NONCE_BYTES)
    await send(bytes([_OK]) + _hello(nonce, channel))
    theirs = await recv(PROOF_BYTES)
    if not hmac.compare_digest(theirs, _proof(secret, _ROLE_CLIENT, peer_nonce, nonce, channel)):
        await _refuse(send, _REFUSED_PROOF)
        raise AuthError(f"{channel.value} channel from {peer} refused: the peer does not hold the cluster secret")
    await send(bytes([_OK]) + _proof(secret, _ROLE_SERVER, nonce, peer_nonce, channel))


async def _bounded(run: Awaitable[None], channel: Channel, peer: str, timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(run, timeout)
    except asyncio.TimeoutError:
        raise AuthError(
            f"{channel.value} channel {what} {peer}: handshake not completed within {timeout}s "
            "(transfer.connect_timeout_s)"
        ) from None
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        raise AuthError(f"{channel.value} channel {what} {peer}: connection lost during the handshake: {e}") from None


def _stream_io(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[Recv, Send]:
    async def recv(n: int) -> bytes:
        return await reader.readexactly(n)

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return recv, send


def _sock_io(sock: "socket.socket | Conn") -> tuple[Recv, Send]:
    """recv/send over a raw socket or a transport connection (plain or TLS, transfer.conn)."""
    from lambdascale.transfer.conn import SockConn

    conn = SockConn(sock) if isinstance(sock, socket.socket) else sock

    async def recv(n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await conn.recv_into(view[got:])
            if k == 0:
                raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
            got += k
        return bytes(buf)

    async def send(data: bytes) -> None:
        await conn.sendall(data)

    return recv, send


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, channel: Channel,
    timeout: float, peer: str,
) -> None:
    """Open a stream channel as the connecting side; ``AuthError`` unless both sides hold ``secret``."""
    recv, send = _stream_io(reader, writer)
    await _bounded(_client(recv, send, secret, channel, peer), channel, peer, timeout, "to")


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, channel: Channel,
    timeout: float, peer: str,
) -> None:
    """Accept a stream channel; ``AuthError`` unless the client proves it holds ``secret``."""
    recv, send = _stream_io(reader, writer)
    await _bounded(_server(recv, send, secret, channel, peer), channel, peer, timeout, "from")


async def client_handshake_sock(sock: "socket.socket | Conn", secret: bytes, channel: Channel, timeout: float, peer: str) -> None:
    """:func:`client_handshake` over a connected non-blocking socket."""
    recv, send = _sock_io(sock)
    await _bounded(_client(recv, send, secret, channel, peer), channel, peer, timeout, "to")


async def server_handshake_sock(sock: "socket.socket | Conn", secret: bytes, channel: Channel, timeout: float, peer: str) -> None:
    """:func:`server_handshake` over an accepted non-blocking socket."""
    recv, send = _sock_io(sock)
    await _bounded(_server(recv, send, secret, channel, peer), channel, peer, timeout, "from")


def peer_name(addr: object) -> str:
    """``host:port`` of a socket address (as ``getpeername`` / ``get_extra_info`` give it)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr) if addr else "an unknown peer"
