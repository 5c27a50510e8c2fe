"""The cluster secret's challenge-response (transfer/auth.py): both variants, refusals, replays,
the secret file's checks."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from lambdascale.errors import LambdaScaleError
from lambdascale.transfer.auth import (
    SECRET_ENV,
    AuthError,
    Channel,
    client_handshake,
    client_handshake_sock,
    load_secret,
    new_secret,
    read_secret_file,
    server_handshake,
    server_handshake_sock,
    take_secret_from_env,
    write_secret_file,
)

SECRET = new_secret()
OTHER = new_secret()
T = 5.0  # handshake timeout: generous, these never wait on it unless the test is about it


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _both(client_secret: bytes, server_secret: bytes, client_ch: Channel = Channel.TRANSFER,
                server_ch: Channel = Channel.TRANSFER) -> tuple[BaseException | None, BaseException | None]:
    """Run the socket variant's client on one end of a socketpair and its server on the other."""
    a, b = _pair()
    try:
        res = await asyncio.gather(
            client_handshake_sock(a, client_secret, client_ch, T, "server"),
            server_handshake_sock(b, server_secret, server_ch, T, "client"),
            return_exceptions=True,
        )
    finally:
        a.close()
        b.close()
    return res[0], res[1]  # type: ignore[return-value]


def test_same_secret_opens_both_variants() -> None:
    assert run(_both(SECRET, SECRET)) == (None, None)

    async def streams() -> None:
        got: list[BaseException | None] = []
        done = asyncio.Event()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await server_handshake(r, w, SECRET, Channel.CONTROL, T, "client")
                got.append(None)
                w.write(b"after")  # the channel is usable after the handshake
                await w.drain()
            except AuthError as e:
                got.append(e)
            finally:
                w.close()
                done.set()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
            await client_handshake(r, w, SECRET, Channel.CONTROL, T, "controller")
            assert await r.readexactly(5) == b"after"
            w.close()
            await done.wait()
            assert got == [None]
        finally:
            srv.close()
            await srv.wait_closed()

    run(streams())


def test_wrong_secret_is_refused_on_both_sides_without_naming_it() -> None:
    client_err, server_err = run(_both(OTHER, SECRET))
    assert isinstance(server_err, AuthError) and "from client refused: the peer does not hold the cluster secret" in str(server_err)
    assert isinstance(client_err, AuthError) and "different cluster secrets" in str(client_err)
    for e in (client_err, server_err):
        assert SECRET.hex() not in str(e) and OTHER.hex() not in str(e)


def test_a_proof_for_one_channel_kind_does_not_open_another() -> None:
    client_err, server_err = run(_both(SECRET, SECRET, client_ch=Channel.CONTROL, server_ch=Channel.TRANSFER))
    assert isinstance(server_err, AuthError) and "another kind of channel" in str(server_err)
    assert isinstance(client_err, AuthError) and "refused the handshake" in str(client_err)


async def drain(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until the peer closes (a reset ends it too: a peer that closes
    with bytes of ours unread resets the connection, and what it sent last may be lost)."""
    loop = asyncio.get_running_loop()
    got = b""
    try:
        while chunk := await loop.sock_recv(sock, 4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.mark.parametrize("extra", [0, 26], ids=["hello-sized", "longer"])
def test_garbage_gets_one_refusal_byte_and_nothing_else(extra: int) -> None:
    async def main() -> bytes:
        a, b = _pair()
        loop = asyncio.get_running_loop()
        srv = loop.create_task(server_handshake_sock(b, SECRET, Channel.TRANSFER, T, "client"))
        await loop.sock_sendall(a, b"\x00\x00\x00\x10" + b"{" * (34 + extra))  # a control frame, say
        with pytest.raises(AuthError, match="no lambdascale handshake"):
            await srv
        b.close()
        got = await drain(a)
        a.close()
        return got

    got = run(main())
    assert got == b"\x01" if extra == 0 else got in (b"", b"\x01")


def test_silent_client_times_out_with_the_setting_named() -> None:
    async def main() -> None:
        a, b = _pair()
        try:
            with pytest.raises(AuthError, match=r"from client: handshake not completed within 0.2s \(transfer.connect_timeout_s\)"):
                await server_handshake_sock(b, SECRET, Channel.TRANSFER, 0.2, "client")
        finally:
            a.close()
            b.close()

    run(main())


async def _recording_relay(secret_client: bytes) -> bytes:
    """A legitimate handshake through a relay that records the client's bytes; returns them."""
    c, r1 = _pair()
    r2, s = _pair()
    loop = asyncio.get_running_loop()
    recorded = bytearray()

    async def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        while data := await loop.sock_recv(src, 4096):
            if record:
                recorded.extend(data)
            await loop.sock_sendall(dst, data)

    pumps = [loop.create_task(pump(r1, r2, True)), loop.create_task(pump(r2, r1, False))]
    try:
        await asyncio.gather(
            client_handshake_sock(c, secret_client, Channel.CONTROL, T, "server"),
            server_handshake_sock(s, SECRET, Channel.CONTROL, T, "client"),
        )
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for x in (c, r1, r2, s):
            x.close()
    return bytes(recorded)


def test_a_replayed_handshake_is_refused() -> None:
    async def main() -> None:
        recorded = await _recording_relay(SECRET)
        assert len(recorded) == 38 + 32  # hello + proof: all a client ever sends
        a, b = _pair()
        loop = asyncio.get_running_loop()
        srv = loop.create_task(server_handshake_sock(b, SECRET, Channel.CONTROL, T, "replayer"))
        await loop.sock_sendall(a, recorded)  # the whole recorded handshake, as an eavesdropper would
        with pytest.raises(AuthError, match="replayer refused: the peer does not hold the cluster secret"):
            await srv
        b.close()
        got = await drain(a)
        a.close()
        # its own fresh hello (status 0 + 38 bytes), then the refusal: no proof of the server's
        assert len(got) == 1 + 38 + 1 and got[0] == 0 and got[-1] == 2

    run(main())


def test_secret_file_checks(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    write_secret_file(good, SECRET)
    assert (good.stat().st_mode & 0o777) == 0o600
    assert read_secret_file(good) == SECRET == load_secret(str(good))
    assert len(load_secret(None)) >= 32 and load_secret(None) != load_secret(None)
    with pytest.raises(LambdaScaleError, match="does not exist"):
        read_secret_file(tmp_path / "missing")
    open_file = tmp_path / "open"
    open_file.write_text(SECRET.hex())
    open_file.chmod(0o644)
    with pytest.raises(LambdaScaleError, match=r"mode 0644: others than its owner may read it; chmod 600") as ei:
        read_secret_file(open_file)
    assert SECRET.hex() not in str(ei.value)
    for name, text, why in [("empty", "\n", "is empty"), ("short", "ab" * 16, "16-byte secret; at least 32"),
                            ("nothex", "zz" * 40, "is not hex")]:
        p = tmp_path / name
        p.write_text(text)
        p.chmod(0o600)
        with pytest.raises(LambdaScaleError, match=why):
            read_secret_file(p)


def test_the_secret_leaves_the_environment_once_read() -> None:
    env = {SECRET_ENV: SECRET.hex(), "OTHER": "1"}
    assert take_secret_from_env(env) == SECRET
    assert env == {"OTHER": "1"}
    assert take_secret_from_env(env) is None
    assert SECRET_ENV not in os.environ


def test_tcp_transports_prove_the_secret_before_a_byte_lands() -> None:
    """Two transports holding the secret move bytes (send and fetch); one holding another secret
    is refused with a clear error, and nothing of its lands in the receiver's buffer."""
    import numpy as np

    from lambdascale.transfer.factory import make_transport
    from lambdascale.transfer.settings import TransferSettings

    async def main() -> None:
        ts = TransferSettings(connect_timeout_s=2.0)
        a, b, m = (make_transport("tcp", i, ts, secret=s) for i, s in enumerate((SECRET, SECRET, OTHER)))
        try:
            for t, fill in ((a, 1), (b, 0), (m, 7)):
                await t.start()
                np.frombuffer(t.register("x", 4096), dtype=np.uint8)[:] = fill
            for t in (a, m):
                t.add_peer(b.info())
            await a.send(1, "x", 0, 4096, "ok")
            assert (await asyncio.wait_for(b.arrivals.get(), 5)).tag == "ok"
            assert bytes(b.buffer("x")) == b"\x01" * 4096
            await a.fetch(1, "x", 0, 16)  # the same authenticated connection serves fetches
            with pytest.raises(AuthError, match=r"node 2: transfer channel to node 1 at 127.0.0.1:\d+: .*different cluster secrets"):
                await m.send(1, "x", 0, 4096, "evil")
            with pytest.raises(AuthError):
                await m.fetch(1, "x", 0, 4096)
            assert b.arrivals.empty() and bytes(b.buffer("x")) == b"\x01" * 4096
            assert bytes(m.buffer("x")) == b"\x07" * 4096  # a fetch without the secret reads nothing
            await a.send(1, "x", 0, 8, "still")  # the listener goes on serving
            assert (await asyncio.wait_for(b.arrivals.get(), 5)).tag == "still"
        finally:
            for t in (a, b, m):
                await t.close()

    run(main())
