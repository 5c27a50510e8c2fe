"""Node agent: one process per node; owns its model buffers (host tier) and its transport endpoint.

The agent dials the controller at the address its launcher gives, registers (node id, pid,
transport address), sends heartbeats and answers typed control messages
(:mod:`lambdascale.runtime.messages`). This module is the agent's process and its message
dispatch; the work is done by three parts it owns:

* :class:`~lambdascale.runtime.agent_models.ModelBuffers`: one transport buffer per model holding
  its whole byte stream, reads from the store or SSD (every chunk verified), memory tiers,
  eviction and copy-back;
* :class:`~lambdascale.runtime.agent_sends.ChunkSends`: multicast send lists (chunk-level
  forwarding of held chunks only) and the xxh64 check of every arriving chunk;
* :class:`~lambdascale.runtime.agent_stages.AgentStages`: pipeline stages built from the buffers
  (torch loaded lazily), their steps on the node's one device, and their KV moves.

Sessions and incarnations: each registration opens a session the controller numbers (its
incarnation, :class:`~lambdascale.runtime.messages.Welcome`); every message of the session
carries it. When the channel ends (the controller declared this node dead after a pause, or
restarted), the agent fences the old incarnation off on its side (its requests, send lists,
stages, copy-backs and transient buffers are stopped; a late reply of it is never sent on the new
channel), then registers again with what it holds now (SSD files re-verified, memory as it
stands) and takes work as the next incarnation.

Dying with the launcher: the agent exits when its parent process changes (checked every
heartbeat), on ``Shutdown``, when no controller answers within ``runtime.register_timeout_s``
and, on Linux, through ``PR_SET_PDEATHSIG`` = SIGKILL set at start-up, so a hard kill of the
controller leaves no orphan.

Run as ``python -m lambdascale.runtime.agent --controller HOST:PORT --node N``
(:func:`lambdascale.runtime.launcher_base.agent_command`), the cluster secret in the environment
(``LAMBDASCALE_CLUSTER_SECRET``, hex; removed from it at once) or in ``--token-file PATH`` (mode
0600): the agent proves it to the controller before registering (:mod:`lambdascale.transfer.auth`)
and its transport asks it of every peer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import ssl
import sys
from typing import Any

import xxhash

from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import Manifest
from lambdascale.runtime.agent_models import ModelBuffers
from lambdascale.runtime.agent_sends import ChunkSends
from lambdascale.runtime.agent_stages import AgentStages
from lambdascale.runtime.messages import (
    CancelSends,
    ControlError,
    CopyBackModel,
    CorruptNext,
    DissolveStage,
    DropModel,
    EvictModel,
    ExportKv,
    FormStage,
    GetHoldings,
    GetStatus,
    Heartbeat,
    HoldingsReport,
    Ping,
    HoldModel,
    ImportKv,
    PrepareReceive,
    Register,
    RegisterBuffer,
    Reply,
    SendBuffer,
    SendChunks,
    SetPeers,
    Shutdown,
    StageStep,
    Warmup,
    Welcome,
    read_msg,
    write_msg,
)
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.runtime.tags import HIDDEN_PREFIX, KV_PREFIX, buffer_name, chunk_tag, kv_tag
from lambdascale.transfer.addresses import bind_transport, interface_of
from lambdascale.transfer.auth import (
    SECRET_ENV,
    AuthError,
    Channel,
    client_handshake,
    read_secret_file,
    take_secret_from_env,
)
from lambdascale.transfer.base import Arrival, Transport
from lambdascale.transfer.conn import tls_contexts
from lambdascale.transfer.factory import make_transport
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger("lambdascale.agent")
PR_SET_PDEATHSIG = 1
_NO_SECRET = f"set {SECRET_ENV} to it in hex, or pass --token-file PATH to a file of mode 0600 holding it"


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class NodeAgent:
    """The agent's connection and message dispatch; :meth:`run` is its whole life."""

    def __init__(
        self,
        node: int,
        controller: tuple[str, int],
        transfer: TransferSettings,
        runtime: RuntimeSettings,
        parent_pid: int | None = None,
        *,
        secret: bytes | None = None,
    ) -> None:
        self.node = node
        self.controller = controller
        # listen where the other hosts reach us: transfer.bind/advertise resolved toward the controller
        transfer = bind_transport(transfer, controller[0])
        if transfer.backend == "nixl" and "UCX_NET_DEVICES" not in os.environ:
            iface = interface_of(transfer.bind)
            if iface is not None and iface != "lo":
                os.environ["UCX_NET_DEVICES"] = iface  # UCX uses the network the tcp transport would
        self.transfer_settings = transfer
        self.runtime = runtime
        self.parent_pid = parent_pid
        # the cluster secret: proved to the controller and on every transport connection; without
        # one, run() refuses to start (an agent in-process for a test of its parts needs none)
        self._secret = secret
        self.transport: Transport = make_transport(transfer.backend, node, transfer, secret=secret)
        tls = tls_contexts(transfer.tls_cert, transfer.tls_key, transfer.tls_ca)
        self._tls_client = tls[1] if tls is not None else None  # the control channel's, as the transport's
        self.buffers = ModelBuffers(node, self.transport, transfer, runtime)
        self.sends = ChunkSends(node, self.transport, self.buffers, self._report, transfer.stall_timeout_s)
        self.stages = AgentStages(node, self.transport, self.buffers, transfer.stall_timeout_s)
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        #: the incarnation the controller gave this process's current session (0: none yet)
        self.incarnation = 0
        self.rejoins = 0
        #: messages of an ended incarnation this agent dropped instead of sending
        self.fenced_here = 0

    def _peer(self) -> dict:
        return {"peer": self.transport.info().model_dump(mode="json")}

    def holdings(self) -> HoldingsReport:
        """This node's tiers now (see :class:`~lambdascale.runtime.messages.HoldingsReport`)."""
        return self.buffers.holdings(self.sends.sending_models())

    def _holdings_json(self) -> dict:
        return self.holdings().model_dump(mode="json")

    def _status(self) -> dict:
        models = self.buffers.models
        return {
            "node": self.node,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "rejoins": self.rejoins,
            "fenced_here": self.fenced_here,
            "models": {n: sorted(s.held) for n, s in models.items()},
            # xxh64 of every block's slice of the stream: lets a test compare a node's bytes with the files
            "block_digests": {
                n: [xxhash.xxh64(self.buffers.block_view(n, b.index)).hexdigest() for b in s.manifest.blocks]
                for n, s in models.items()
            },
            "device_steps": list(self.stages.device_steps),
            "device_preemptions": self.stages.device.preemptions,
            "switch_interval_ms": sys.getswitchinterval() * 1e3,
            "bytes_sent": self.transport.bytes_sent,
            "bytes_received": self.transport.bytes_received,
            # landing-zone arena (runtime.device_arena_gb): None without one (or not made yet)
            "arena_free_bytes": self.buffers.arena_free_bytes(),
        }

    async def _on_arrival(self, arr: Arrival) -> None:
        if arr.tag.startswith(HIDDEN_PREFIX):  # hidden states for a pipeline stage
            self.stages.on_hidden(arr)
        elif arr.tag.startswith(KV_PREFIX):  # shipped KV: the controller sequences it (SendBuffer's reply)
            return
        else:
            await self.sends.on_chunk(arr)

    async def _handle(self, msg: Any) -> dict:
        # ---- peers, models and tiers (agent_models) ----
        if isinstance(msg, SetPeers):
            for p in msg.peers:
                if p.node != self.node:
                    self.transport.add_peer(p)
            return {}
        if isinstance(msg, HoldModel):
            return await self.buffers.hold(msg)
        if isinstance(msg, PrepareReceive):
            manifest = Manifest.model_validate(msg.manifest)
            self.sends.expect_digests(manifest.name, self.transfer_settings.digest, msg.digests, manifest.n_chunks)
            self.buffers.memory.residency(manifest).gpu = True  # landing zone of an instance (the device copy)
            st = await self.buffers.allocate(manifest)
            return {**self._peer(), "held": sorted(st.held)}
        if isinstance(msg, DropModel):
            self.buffers.memory.forget(msg.model)
            self.buffers.free(msg.model)
            return {}
        if isinstance(msg, GetHoldings):
            return {"report": self._holdings_json()}
        if isinstance(msg, EvictModel):
            evicted = self.buffers.evict(msg, self.sends.sending(msg.model))
            return {"evicted": evicted, "report": self._holdings_json()}
        if isinstance(msg, CopyBackModel):
            started = self.buffers.copy_back(msg)
            return {"started": started, "report": self._holdings_json()}
        if isinstance(msg, GetStatus):
            return self._status()
        # ---- multicast (agent_sends) ----
        if isinstance(msg, SendChunks):
            self.sends.start(msg)
            return {}
        if isinstance(msg, CancelSends):  # one multicast's lists; another multicast of the model runs on
            return await self.sends.cancel(msg)
        if isinstance(msg, CorruptNext):
            self.transport.corrupt_tags.add(chunk_tag(msg.model, msg.chunk))
            return {}
        # ---- pipeline stages (agent_stages) ----
        if isinstance(msg, FormStage):
            return await self.stages.form(msg)
        if isinstance(msg, StageStep):
            return await self.stages.step(msg)
        if isinstance(msg, DissolveStage):
            return self.stages.dissolve(msg)
        if isinstance(msg, Warmup):
            await self.stages.load_stage_host()
            arena = await self.buffers.arena_ready()  # resident before any scale-out is timed
            return {"arena_bytes": arena.size if arena is not None else 0}
        if isinstance(msg, ExportKv):
            return await self.stages.export_kv(msg)
        if isinstance(msg, ImportKv):
            return await self.stages.import_kv(msg)
        # ---- raw buffers (KV shipping) ----
        if isinstance(msg, RegisterBuffer):
            if not self.transport.has_buffer(msg.buffer):
                self.transport.register(msg.buffer, msg.nbytes)
            return self._peer()
        if isinstance(msg, SendBuffer):
            n = len(self.transport.buffer(msg.buffer))
            await self.transport.send(msg.dst, msg.buffer, 0, n, kv_tag(msg.buffer))
            self.transport.unregister(msg.buffer)
            return {"nbytes": n}
        if isinstance(msg, Shutdown):
            self._stop.set()
            return {}
        if isinstance(msg, Ping):
            return {}
        raise ControlError(f"node {self.node}: unexpected message {type(msg).__name__}")

    async def _serve_request(self, msg: Any, inc: int) -> None:
        try:
            data = await self._handle(msg)
            reply = Reply(req=msg.req, data=data)
        except (LambdaScaleError, OSError, ValueError, RuntimeError) as e:
            reply = Reply(req=msg.req, ok=False, error=f"node {self.node}: {e}")
        await self._report(reply, inc)

    # ---- sessions: one per incarnation -----------------------------------------------------------
    async def _report(self, msg: Any, inc: int | None = None) -> None:
        """Send ``msg`` stamped with the incarnation it belongs to (default: the current one).

        A message of an earlier incarnation (a reply to a request of a session that ended) is
        dropped here: it may never reach the controller as the new incarnation's. A channel that
        breaks while writing ends the session (its reader sees it); the message is lost with it.
        """
        inc = self.incarnation if inc is None else inc
        writer = self._writer
        if writer is None or inc != self.incarnation or inc == 0:
            self.fenced_here += 1
            return
        if hasattr(msg, "inc"):
            msg = msg.model_copy(update={"inc": inc})
        try:
            async with self._write_lock:
                await write_msg(writer, msg)
        except (ConnectionError, OSError, RuntimeError):
            pass

    async def _control_loop(self, reader: asyncio.StreamReader, inc: int, tasks: set[asyncio.Task]) -> None:
        while True:
            msg = await read_msg(reader)
            if msg is None:
                return  # the controller closed the channel: declared dead, or gone
            t = asyncio.get_running_loop().create_task(self._serve_request(msg, inc))
            tasks.add(t)
            t.add_done_callback(lambda t: self._done(t, tasks, f"a {type(msg).__name__} request"))

    def _done(self, t: asyncio.Task, tasks: set[asyncio.Task], what: str) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("node %d: %s failed: %r", self.node, what, t.exception(), exc_info=t.exception())

    async def _arrival_loop(self) -> None:
        while True:
            await self._on_arrival(await self.transport.arrivals.get())

    async def _heartbeat_loop(self, inc: int) -> None:
        while True:
            await asyncio.sleep(self.runtime.heartbeat_s)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                return  # launcher gone (re-parented): die with it
            await self._report(Heartbeat(node=self.node), inc)

    async def _dial_controller(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the controller, retrying while it is not reachable yet (a supervised agent
        may start before its gateway) for ``runtime.register_timeout_s``; then a ConnectionError
        names the address tried and why. A refused handshake is never retried (run() raises it)."""
        host, port = self.controller
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.runtime.register_timeout_s
        delay = 0.05
        while True:
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port, ssl=self._tls_client,
                                                                      server_hostname="" if self._tls_client else None),
                                              self.transfer_settings.connect_timeout_s)
            except ssl.SSLError as e:  # the controller is there but its TLS refused us: no retry
                raise ConnectionError(f"TLS with the controller at {host}:{port} failed: {e} "
                                      "(transfer.tls_cert / tls_key / tls_ca)") from None
            except (OSError, asyncio.TimeoutError) as e:
                why = "timed out" if isinstance(e, asyncio.TimeoutError) else (
                    os.strerror(e.errno) if e.errno else str(e))
                if loop.time() + delay > deadline:
                    raise ConnectionError(f"cannot reach the controller at {host}:{port} within "
                                          f"runtime.register_timeout_s={self.runtime.register_timeout_s}s: {why}") from None
                if delay == 0.05:
                    print(f"agent {self.node}: controller at {host}:{port} not reachable yet ({why}); retrying for up to "
                          f"{self.runtime.register_timeout_s:.0f}s", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)  # backoff between attempts, not a wait for an event
            delay = min(delay * 2, 1.0)

    async def _register(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        """Dial, prove the secret, register with what this node holds; the new incarnation."""
        host, port = self.controller
        reader, writer = await self._dial_controller()
        try:
            await client_handshake(reader, writer, self._secret, Channel.CONTROL,
                                   self.transfer_settings.connect_timeout_s, f"the controller at {host}:{port}")
            # the SSD tier as the files really are (checksums), memory tiers as they stand
            dropped = {m: why for m, why in (await asyncio.to_thread(self.buffers.memory.verify_ssd)).items()
                       if why != "ok"}
            for m, why in dropped.items():
                print(f"agent {self.node}: SSD copy of {m} dropped: {why}", file=sys.stderr, flush=True)
            await write_msg(writer, Register(node=self.node, pid=os.getpid(), peer=self.transport.info(),
                                             incarnation=self.incarnation, holdings=self.holdings()))
            welcome = await asyncio.wait_for(read_msg(reader), self.runtime.register_timeout_s)
        except BaseException:
            writer.close()
            raise
        if not isinstance(welcome, Welcome):
            writer.close()
            raise ConnectionError(f"the controller at {host}:{port} refused node {self.node}'s registration "
                                  "(is another agent running as this node?)")
        return reader, writer, welcome.incarnation

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inc: int) -> str:
        """Serve one incarnation until its channel ends; returns why ("stop", "parent", "closed")."""
        self._writer, self.incarnation = writer, inc
        tasks: set[asyncio.Task] = set()
        control = asyncio.ensure_future(self._control_loop(reader, inc, tasks))
        beat = asyncio.ensure_future(self._heartbeat_loop(inc))
        stop = asyncio.ensure_future(self._stop.wait())
        loops = {control: "control loop", beat: "heartbeat loop", stop: "stop"}
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._writer = None
            for t in loops:
                t.cancel()
            for t, what in loops.items():
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await t
                    except (ConnectionError, ControlError, OSError) as e:
                        print(f"agent {self.node}: control channel of incarnation {inc} broke in its {what}: {e}",
                              file=sys.stderr, flush=True)
            # fence this incarnation off here too: nothing it started runs on into the next one
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stopping = self.sends.cancel_all()
            await asyncio.gather(*stopping, return_exceptions=True)
            self.buffers.cancel_copies()
            self.stages.reset()
            keep = {buffer_name(m) for m in self.buffers.models}
            for name in self.transport.buffer_names():
                if name not in keep:
                    self.transport.unregister(name)  # hidden states and shipped KV of the old incarnation
            writer.close()
        if stop in done:
            return "stop"
        if beat in done:
            return "parent"
        return "closed"

    async def run(self) -> None:
        """Register, serve, and rejoin as a new incarnation whenever the channel ends (the
        controller declared this node dead, or restarted); exit on Shutdown, when the launcher
        is gone, or when no controller answers within ``runtime.register_timeout_s``."""
        if self._secret is None:
            raise AuthError(f"agent {self.node}: no cluster secret ({_NO_SECRET})")
        self.buffers.start_arena()  # made resident in a worker thread while we register
        await self.transport.start()
        arrivals = asyncio.ensure_future(self._arrival_loop())
        try:
            while True:
                reader, writer, inc = await self._register()
                why = await self._session(reader, writer, inc)
                if why != "closed":
                    return
                self.rejoins += 1
                print(f"agent {self.node}: control channel of incarnation {inc} closed (declared dead, or the "
                      "controller restarted); rejoining", file=sys.stderr, flush=True)
        finally:
            arrivals.cancel()
            await asyncio.gather(arrivals, return_exceptions=True)
            self.sends.cancel_all()
            self.buffers.cancel_copies()
            await self.transport.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lambdascale-agent", description="node agent (started by a launcher)")
    p.add_argument("--controller", required=True, help="HOST:PORT of the controller")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--transfer-json", default="{}", help="TransferSettings as JSON")
    p.add_argument("--runtime-json", default="{}", help="RuntimeSettings as JSON")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when the parent is no longer this pid")
    p.add_argument("--token-file", default=None,
                   help=f"file (mode 0600) holding the cluster secret in hex; default: ${SECRET_ENV}")
    args = p.parse_args(argv)
    try:  # the secret leaves the environment at once, so no child of this process inherits it
        from_env = take_secret_from_env()
        secret = read_secret_file(args.token_file) if args.token_file else from_env
    except LambdaScaleError as e:
        print(f"agent {args.node}: {e}", file=sys.stderr)
        return 2
    if secret is None:
        print(f"agent {args.node}: no cluster secret: {_NO_SECRET}", file=sys.stderr)
        return 2
    set_parent_death_signal()
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 1  # the launcher died before we armed the death signal
    host, _, port = args.controller.rpartition(":")
    runtime = RuntimeSettings.model_validate(json.loads(args.runtime_json))
    # the engine thread (stage steps) and the event loop (sends, control) share one interpreter lock
    sys.setswitchinterval(runtime.agent_switch_interval_ms / 1e3)
    agent = NodeAgent(
        args.node,
        (host, int(port)),
        TransferSettings.model_validate(json.loads(args.transfer_json)),
        runtime,
        parent_pid=args.parent_pid,
        secret=secret,
    )
    try:
        asyncio.run(agent.run())
    except AuthError as e:
        print(f"agent {args.node}: {e}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError, asyncio.TimeoutError) as e:
        print(f"agent {args.node}: control channel to {args.controller} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
