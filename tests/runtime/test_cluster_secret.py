"""The cluster secret on every channel (issue 21): no one without it registers, hears the
controller or lands a byte in an agent's buffers; no one registers as a node that is up; the
secret itself shows in no log line and on no command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import TokenState
from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.cluster import Cluster
from lambdascale.runtime.launcher import LocalCluster, LocalLauncher, agent_command
from lambdascale.runtime.messages import GetHoldings, GetStatus, Heartbeat, HoldModel, Register, encode
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.runtime.tags import buffer_name, chunk_tag
from lambdascale.transfer.auth import (
    SECRET_ENV,
    AuthError,
    Channel,
    client_handshake,
    client_handshake_sock,
    new_secret,
    write_secret_file,
)
from lambdascale.transfer.base import PeerInfo
from lambdascale.transfer.settings import TransferSettings
from lambdascale.transfer.tcp import _HEADER, _MAGIC
from tests.runtime.conftest import run_async
from tests.runtime.test_agents import _gone

RT = RuntimeSettings(heartbeat_s=1.0)
REFUSALS = (b"", b"\x01")  # what a peer that is no lambdascale client may read: a refusal, if that


async def read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Every byte until the peer closes (a reset ends it too). Times out if it never closes, as a
    channel that let the client in would not."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(4096), timeout):
            got += chunk
    return got


async def send_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data``; the peer may have closed already, which is what these tests expect."""
    with contextlib.suppress(ConnectionError):
        writer.write(data)
        await writer.drain()


class LogWatch(logging.Handler):
    """Collects the messages of lambdascale's loggers; :meth:`wait_for` waits for one containing a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.messages.append(record.getMessage())
            self._changed.notify_all()

    def matching(self, text: str) -> list[str]:
        return [m for m in self.messages if text in m]

    async def wait_for(self, text: str, timeout: float = 10.0) -> str:
        def wait() -> str:
            with self._changed:
                assert self._changed.wait_for(lambda: self.matching(text), timeout), (
                    f"no log line containing {text!r}; got {self.messages}")
                return self.matching(text)[0]

        return await asyncio.to_thread(wait)


@pytest.fixture
def logs():
    watch = LogWatch()
    root = logging.getLogger("lambdascale")
    old = root.level
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    yield watch
    root.removeHandler(watch)
    root.setLevel(old)


def register_frame(node: int) -> bytes:
    return encode(Register(node=node, pid=4242, peer=PeerInfo(node=node, backend="tcp", host="127.0.0.1", port=9)))


def test_a_rogue_registration_for_a_live_node_is_refused_and_the_node_keeps_serving(tiny_model: Path, logs) -> None:
    state = TokenState((1, 5, 9, 13, 17), (), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), 0)
    eng = Engine.from_checkpoint(tiny_model)
    want = [t for o in eng.stream(eng.resume(state, request_id="r")) for t in o.token_ids]
    manifest = read_manifest(tiny_model)
    eos = manifest.arch.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    async def main() -> None:
        async with LocalCluster(2, runtime=RT) as lc:
            c = lc.cluster
            pid0 = c.agents[0].pid
            # 1. the embedded default's old hole: one register frame, no handshake
            r, w = await asyncio.open_connection(*c.address)
            await send_quietly(w, register_frame(0))
            assert await read_all(r) in REFUSALS
            w.close()
            # 2. a handshake with a secret of its own
            r, w = await asyncio.open_connection(*c.address)
            with pytest.raises(AuthError, match="different cluster secrets"):
                await client_handshake(r, w, new_secret(), Channel.CONTROL, 5.0, "the controller")
            await send_quietly(w, register_frame(0))
            assert await read_all(r) == b""
            w.close()
            # 3. even with the secret (a second agent started as node 0 by mistake): node 0 is up
            r, w = await asyncio.open_connection(*c.address)
            await client_handshake(r, w, c.secret, Channel.CONTROL, 5.0, "the controller")
            await send_quietly(w, register_frame(0))
            assert await read_all(r) == b""
            w.close()

            assert c.alive() == [0, 1] and c.agents[0].pid == pid0
            assert (await c.request(0, GetStatus(req=0)))["pid"] == pid0
            await c.request(0, GetHoldings(req=0))
            # node 0 still runs pipeline steps: a two-stage pipeline gives the single-node tokens
            for n in (0, 1):
                await c.request(n, HoldModel(req=0, model_dir=str(tiny_model)))
            pipe = RemotePipeline(c, manifest, [StagePlacement(0, (0, 4)), StagePlacement(1, (4, 8))])
            await pipe.form()
            srv = PipelineServer(pipe, eos_ids)
            srv.add("r", state)
            await srv.run()
            assert srv.finished["r"] == want

    run_async(main(), timeout=120)
    assert len(logs.matching("refused: its first bytes are no lambdascale handshake")) == 1
    assert len(logs.matching("refused: the peer does not hold the cluster secret")) == 1
    assert len(logs.matching("registration as node 0: node 0 is up")) == 1
    assert all("127.0.0.1:" in m for m in logs.matching("refused"))  # each names the peer's address


def test_a_client_without_the_secret_hears_nothing_from_the_controller(logs) -> None:
    async def main() -> None:
        async with LocalCluster(1, runtime=RT) as lc:
            c = lc.cluster
            # frames an agent would send, for a node the cluster does not have yet
            r, w = await asyncio.open_connection(*c.address)
            await send_quietly(w, register_frame(5) + encode(Heartbeat(node=5)) * 3)
            assert await read_all(r) in REFUSALS
            w.close()
            # a proper hello, then a forged proof: one nonce, one refusal byte, the door closed
            r, w = await asyncio.open_connection(*c.address)
            await send_quietly(w, b"LSAH\x01\x01" + os.urandom(32))
            head = await r.readexactly(1 + 38)
            assert head[0] == 0 and head[1:5] == b"LSAH"
            await send_quietly(w, os.urandom(32) + register_frame(5))
            assert await read_all(r) in (b"\x02", b"")
            w.close()
            assert 5 not in c.agents and c.alive() == [0]
            await c.broadcast_peers()  # the controller talks to its one real agent only
            assert (await c.request(0, GetStatus(req=0)))["node"] == 0

    run_async(main())
    assert len(logs.matching("control channel from 127.0.0.1:")) == 2


def test_a_client_without_the_secret_lands_nothing_in_an_agents_buffers(tiny_model: Path) -> None:
    manifest = read_manifest(tiny_model)

    async def main() -> None:
        async with LocalCluster(2, runtime=RT) as lc:
            c = lc.cluster
            await c.request(1, HoldModel(req=0, model_dir=str(tiny_model)))
            await prepare_receivers(c, manifest, [0])
            peer = c.agents[0].peer
            before = await c.request(0, GetStatus(req=0))
            assert before["models"][manifest.name] == []
            n = 4096
            name, tag = buffer_name(manifest.name).encode(), chunk_tag(manifest.name, 0).encode()
            frame = _HEADER.pack(_MAGIC, 1, 0, n, len(name), len(tag)) + name + tag + b"\xab" * n
            with c.subscribe() as events:
                # a data frame straight away, as the tcp transport sends them
                r, w = await asyncio.open_connection(peer.host, peer.port)
                await send_quietly(w, frame)
                assert await read_all(r) in REFUSALS
                w.close()
                # a handshake with the wrong secret first
                s = socket.create_connection((peer.host, peer.port))
                s.setblocking(False)
                with pytest.raises(AuthError, match="different cluster secrets"):
                    await client_handshake_sock(s, new_secret(), Channel.TRANSFER, 5.0, "node 0")
                with contextlib.suppress(OSError):
                    await asyncio.get_running_loop().sock_sendall(s, frame)
                s.close()
                after = await c.request(0, GetStatus(req=0))
                assert after["models"][manifest.name] == []  # no chunk arrived
                assert after["block_digests"] == before["block_digests"]  # not a byte changed
                assert after["bytes_received"] == before["bytes_received"] == 0
                assert events.empty()  # no ChunkHeld / ChunkCorrupt: the agent saw no arrival
            # the agent still receives from its real peers, over authenticated connections
            res = await run_multicast(c, manifest, [1], [0], timeout_s=30)
            assert set(res.node_full_s) == {0}
            done = await c.request(0, GetStatus(req=0))
            assert done["block_digests"][manifest.name] == (await c.request(1, GetStatus(req=0)))["block_digests"][manifest.name]

    run_async(main())


def _agent_env(secret_hex: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    if secret_hex is not None:
        env[SECRET_ENV] = secret_hex
    return env


async def _run_agent(argv: list[str], env: dict[str, str], timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def test_an_agent_with_the_wrong_secret_is_refused_with_a_clear_error_on_both_sides(logs) -> None:
    async def main() -> None:
        c = Cluster(RT, secret=new_secret())
        await c.start()
        try:
            argv = agent_command(0, c.address, TransferSettings(), RT, os.getpid())
            rc, err = await _run_agent(argv, _agent_env(new_secret().hex()))
            host, port = c.address
            assert rc == 1, err
            assert (f"agent 0: control channel to the controller at {host}:{port}: the peer refused this "
                    f"process's proof: the two hold different cluster secrets") in err
            line = await logs.wait_for("refused: the peer does not hold the cluster secret")
            assert line.startswith("controller: control channel from 127.0.0.1:")
            assert c.agents == {}
        finally:
            await c.close()

    run_async(main())
    assert len(logs.matching("refused")) == 1  # once, and the listener went on (close() found it serving)


def test_an_agent_without_a_usable_secret_will_not_start(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "lambdascale.runtime.agent", "--controller", "127.0.0.1:9", "--node", "3"]
    rc, err = run_async(_run_agent(base, _agent_env(None)))
    assert rc == 2 and err.strip() == (
        f"agent 3: no cluster secret: set {SECRET_ENV} to it in hex, or pass --token-file PATH to a file of "
        "mode 0600 holding it")
    loose = tmp_path / "token"
    write_secret_file(loose, new_secret())
    loose.chmod(0o640)
    rc, err = run_async(_run_agent([*base, "--token-file", str(loose)], _agent_env(None)))
    assert rc == 2 and "mode 0640" in err and "chmod 600" in err


def test_a_replayed_agent_handshake_is_refused(logs) -> None:
    """Record a real agent's control channel through a relay; replaying its bytes (hello, proof,
    register) on a new connection gets a fresh nonce, so the recorded proof is wrong."""

    async def main() -> None:
        c = Cluster(RT, secret=new_secret())
        await c.start()
        recorded = bytearray()
        pumps: set[asyncio.Task] = set()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(4096):
                    if record:
                        recorded.extend(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection(*c.address)
            for t in (pump(r, uw, True), pump(ur, w, False)):
                task = asyncio.get_running_loop().create_task(t)
                pumps.add(task)

        srv = await asyncio.start_server(relay, "127.0.0.1", 0)
        proc = await asyncio.create_subprocess_exec(
            *agent_command(0, srv.sockets[0].getsockname()[:2], TransferSettings(), RT, os.getpid()),
            env=_agent_env(c.secret.hex()), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        try:
            await c.wait_for_agents([0], timeout=30)
            pid = c.agents[0].pid
            assert pid == proc.pid and len(recorded) > 38 + 32
            r, w = await asyncio.open_connection(*c.address)
            await send_quietly(w, bytes(recorded))
            got = await read_all(r)
            w.close()
            assert got[:1] == b"\x00" and got[1:5] == b"LSAH" and got[39:] in (b"\x02", b"")
            await logs.wait_for("refused: the peer does not hold the cluster secret")
            assert c.alive() == [0] and c.agents[0].pid == pid
            assert (await c.request(0, GetStatus(req=0)))["pid"] == pid
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            srv.close()
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await c.close()

    run_async(main())


def test_the_secret_is_in_no_log_line_and_on_no_command_line(tiny_model: Path, tmp_path: Path, logs) -> None:
    manifest = read_manifest(tiny_model)
    agent_err = tmp_path / "agents.err"

    async def main() -> tuple[bytes, list[int], list[bytes], str]:
        rt = RuntimeSettings(heartbeat_s=0.5)
        lc = LocalCluster(3, runtime=rt, launcher=LocalLauncher(runtime=rt, stderr_path=str(agent_err)))
        async with lc:
            c = lc.cluster
            pids = list(lc.launcher.pids().values())
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
            await c.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            await prepare_receivers(c, manifest, [1, 2])
            res = await run_multicast(c, manifest, [0], [1, 2], timeout_s=30)  # agent-to-agent handshakes too
            assert set(res.node_full_s) == {1, 2}
            return c.secret, pids, cmdlines, lc.runtime.model_dump_json() + lc.transfer.model_dump_json()

    secret, pids, cmdlines, settings_json = run_async(main())
    assert all(_gone(p) for p in pids)
    forms = [secret.hex(), secret.hex().upper(), repr(secret)]
    for text in [*logs.messages, settings_json, agent_err.read_text()]:
        assert not any(f in text for f in forms)
    for cmd in cmdlines:
        assert secret.hex().encode() not in cmd and secret not in cmd


def test_the_secret_comes_from_runtime_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    secret = new_secret()
    write_secret_file(path, secret)
    assert LocalCluster(1, runtime=RuntimeSettings(secret_file=str(path))).cluster.secret == secret
    assert LocalCluster(1).cluster.secret != LocalCluster(1).cluster.secret  # fresh per cluster
    path.chmod(0o644)
    with pytest.raises(LambdaScaleError, match="mode 0644"):
        LocalCluster(1, runtime=RuntimeSettings(secret_file=str(path)))
