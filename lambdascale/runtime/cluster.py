"""Controller side of the runtime: the agents' registry, request/reply over the control channel,
the stream of agent events, and loss detection.

:class:`Cluster` listens on 127.0.0.1, or the address ``runtime.controller_bind`` resolves to
(:func:`lambdascale.runtime.launcher.controller_addresses`); launchers tell each agent the
advertised address.
Agents register, then every request (``await cluster.request(node, Msg(req=0, ...))``) is matched
to its :class:`~lambdascale.runtime.messages.Reply` by id. Unsolicited reports (chunk held /
corrupt, send failed) and :class:`NodeLost` go to every queue open from :meth:`Cluster.subscribe`
(each multicast reads its own, so multicasts of different models run side by side). An agent is lost when
its control connection closes or it misses ``heartbeat_misses`` heartbeats; pending requests to it
fail with :class:`NodeLostError` at once, never hang.

Every control channel opens with the cluster secret's challenge-response
(:mod:`lambdascale.transfer.auth`) before a message is read; a refused one is logged once with
the peer's address and closed, and the listener goes on. A ``Register`` for a node that is up is
refused too: nobody takes over a node that serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lambdascale.errors import LambdaScaleError
from lambdascale.runtime.messages import (
    ChunkCorrupt,
    ChunkHeld,
    ControlError,
    CopyBackModel,
    EvictModel,
    GetHoldings,
    HoldingsReport,
    Heartbeat,
    Register,
    Reply,
    SendFailed,
    SetPeers,
    read_msg,
    write_msg,
)
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import AuthError, Channel, new_secret, peer_name, server_handshake
from lambdascale.transfer.base import PeerInfo
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger(__name__)


class NodeLostError(LambdaScaleError):
    """An agent died or went silent while the controller needed it."""


class AgentRequestError(LambdaScaleError):
    """An agent answered a request with an error (its message says which node and why)."""


class NodeStatus(str, Enum):
    UP = "up"
    LOST = "lost"


@dataclass(frozen=True)
class NodeLost:
    """Event: ``node`` is gone (connection closed or heartbeats missed)."""

    node: int
    reason: str
    type: str = "node_lost"


@dataclass
class AgentHandle:
    node: int
    pid: int
    peer: PeerInfo
    writer: asyncio.StreamWriter
    status: NodeStatus = NodeStatus.UP
    last_seen: float = field(default_factory=time.monotonic)
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


ClusterEvent = ChunkHeld | ChunkCorrupt | SendFailed | NodeLost


class Cluster:
    """Registry of node agents and the controller's end of every control channel."""

    def __init__(self, runtime: RuntimeSettings | None = None, host: str = "127.0.0.1",
                 advertise: str | None = None, port: int = 0, *, secret: bytes | None = None,
                 handshake_timeout_s: float | None = None, digest: str = "none",
                 tls: ssl.SSLContext | None = None) -> None:
        self.settings = runtime or RuntimeSettings()
        self.tls = tls  # server side of mutual TLS on every control connection (transfer.tls_*), or None
        self.digest = digest  # transfer.digest: receivers check each chunk's digest too (runtime.multicast)
        self.host = host  # what the listener binds
        self.advertise = advertise or host  # what agents are told to dial
        self.port = port
        self.agents: dict[int, AgentHandle] = {}
        # the cluster secret every agent proves before its first message is read (transfer/auth.py);
        # None = a fresh one, which the caller reads from .secret to hand to its agents
        self.secret = secret if secret is not None else new_secret()
        self._handshake_timeout_s = (
            TransferSettings().connect_timeout_s if handshake_timeout_s is None else handshake_timeout_s
        )
        self._subscribers: set[asyncio.Queue[ClusterEvent]] = set()
        self._server: asyncio.Server | None = None
        self._req_ids = itertools.count(1)
        self._registered = asyncio.Condition()
        self._handlers: set[asyncio.Task] = set()  # one per open control connection (close() waits for them)
        self._monitor: asyncio.Task | None = None

    async def start(self) -> tuple[str, int]:
        """Listen for agents; returns the (host, port) to give launchers."""
        try:
            self._server = await asyncio.start_server(self._on_agent, self.host, self.port, ssl=self.tls,
                                                      ssl_handshake_timeout=self._handshake_timeout_s if self.tls else None)
        except OSError as e:
            raise LambdaScaleError(f"the controller cannot listen on {self.host}:{self.port} "
                                   f"(runtime.controller_bind / controller_port): {e.strerror or e}") from None
        self._monitor = asyncio.get_running_loop().create_task(self._watch_heartbeats())
        log.info("controller listening for agents on %s:%d (agents dial %s:%d; %s)", self.host, self.address[1],
                 *self.address, "mutual TLS" if self.tls else "no TLS")
        return self.address

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[ClusterEvent]]:
        """A queue that receives every event from now until the block exits.

        Every open queue gets every event, so concurrent readers (one per multicast) each see
        their own chunk reports and every :class:`NodeLost`. Events with no queue open are dropped:
        a node's state stays readable from :meth:`alive`.
        """
        q: asyncio.Queue[ClusterEvent] = asyncio.Queue()
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    def _publish(self, ev: ClusterEvent) -> None:
        for q in self._subscribers:
            q.put_nowait(ev)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "cluster not started"
        return self.advertise, self._server.sockets[0].getsockname()[1]

    def alive(self) -> list[int]:
        return sorted(n for n, a in self.agents.items() if a.status is NodeStatus.UP)

    async def wait_for_agents(self, nodes: list[int], timeout: float | None = None) -> None:
        """Wait until every node in ``nodes`` registered; a clear error names the missing ones."""
        timeout = self.settings.register_timeout_s if timeout is None else timeout

        async def ready() -> None:
            async with self._registered:
                await self._registered.wait_for(lambda: all(n in self.agents for n in nodes))

        try:
            await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(nodes) - set(self.agents))
            raise NodeLostError(
                f"agents {missing} did not register within {timeout}s (runtime.register_timeout_s)"
            ) from None

    async def _on_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
        handle: AgentHandle | None = None
        reason = "control connection closed"
        peer = peer_name(writer.get_extra_info("peername"))
        try:
            # before any message is read: a peer without the cluster secret gets a nonce and a refusal
            await server_handshake(reader, writer, self.secret, Channel.CONTROL, self._handshake_timeout_s, peer)
        except AuthError as e:
            log.warning("controller: %s", e)
            writer.close()
            return
        try:
            first = await read_msg(reader)
            if not isinstance(first, Register):
                log.warning("controller: %s opened a control channel with a %s, not a register; closed",
                            peer, type(first).__name__ if first is not None else "close")
                writer.close()
                return
            live = self.agents.get(first.node)
            if live is not None and live.status is NodeStatus.UP:
                # one registration per live node, so no one takes over a node that serves (the membership
                # issue is to let the same node's new incarnation in, proving the secret)
                log.warning("controller: refused %s's registration as node %d: node %d is up (pid %d)",
                            peer, first.node, first.node, live.pid)
                writer.close()
                return
            handle = AgentHandle(node=first.node, pid=first.pid, peer=first.peer, writer=writer)
            self.agents[first.node] = handle
            async with self._registered:
                self._registered.notify_all()
            while True:
                msg = await read_msg(reader)
                if msg is None:
                    break
                handle.last_seen = time.monotonic()
                if isinstance(msg, Reply):
                    fut = handle.pending.pop(msg.req, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg, Heartbeat):
                    pass
                elif isinstance(msg, (ChunkHeld, ChunkCorrupt, SendFailed)):
                    self._publish(msg)
                else:
                    log.warning("node %d sent an unexpected %s; ignored", handle.node, type(msg).__name__)
        except (ConnectionError, ControlError) as e:
            reason = f"control channel error: {e}"
        finally:
            if handle is not None:
                self._mark_lost(handle, reason)

    def _mark_lost(self, handle: AgentHandle, reason: str) -> None:
        if handle.status is NodeStatus.LOST:
            return
        handle.status = NodeStatus.LOST
        for fut in handle.pending.values():
            if not fut.done():
                fut.set_exception(NodeLostError(f"node {handle.node} lost: {reason}"))
        handle.pending.clear()
        handle.writer.close()
        self._publish(NodeLost(handle.node, reason))

    async def _watch_heartbeats(self) -> None:
        limit = self.settings.heartbeat_s * self.settings.heartbeat_misses
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            now = time.monotonic()
            for h in list(self.agents.values()):
                if h.status is NodeStatus.UP and now - h.last_seen > limit:
                    self._mark_lost(h, f"no heartbeat for {now - h.last_seen:.1f}s (limit {limit:.1f}s)")

    async def request(self, node: int, msg: Any, timeout: float | None = None) -> dict[str, Any]:
        """Send a request (its ``req`` is assigned here) and return the reply's data."""
        h = self.agents.get(node)
        if h is None or h.status is not NodeStatus.UP:
            raise NodeLostError(f"node {node} is not up")
        msg = msg.model_copy(update={"req": next(self._req_ids)})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        h.pending[msg.req] = fut
        try:
            async with h.lock:
                await write_msg(h.writer, msg)
        except (ConnectionError, RuntimeError) as e:
            h.pending.pop(msg.req, None)
            self._mark_lost(h, f"cannot write to control channel: {e}")
            raise NodeLostError(f"node {node} lost: {e}") from None
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        try:
            reply: Reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            h.pending.pop(msg.req, None)
            raise NodeLostError(
                f"node {node} did not answer {type(msg).__name__} within {timeout}s (runtime.request_timeout_s)"
            ) from None
        if not reply.ok:
            raise AgentRequestError(reply.error)
        if "peer" in reply.data:
            h.peer = PeerInfo.model_validate(reply.data["peer"])
        return reply.data

    # ---- memory tiers (runtime/agent_memory.py) --------------------------------------------
    async def holdings(self, node: int) -> HoldingsReport:
        """``node``'s tiers: capacities, free bytes, and each model's copies with bytes and idle time."""
        data = await self.request(node, GetHoldings(req=0))
        return HoldingsReport.model_validate(data["report"])

    async def evict(self, node: int, model: str, tier: str) -> tuple[bool, HoldingsReport]:
        """Drop ``model`` from ``tier`` on ``node``; (evicted, report). ``AgentRequestError`` when in use."""
        data = await self.request(node, EvictModel(req=0, model=model, tier=tier))  # type: ignore[arg-type]
        return bool(data["evicted"]), HoldingsReport.model_validate(data["report"])

    async def copy_back(self, node: int, model: str, to_tier: str) -> tuple[bool, HoldingsReport]:
        """Start a background copy of ``model`` into ``to_tier`` on ``node``; (started, report).

        ``AgentRequestError`` when the node has no complete copy in memory or the tier cannot fit it.
        """
        data = await self.request(node, CopyBackModel(req=0, model=model, to_tier=to_tier))  # type: ignore[arg-type]
        return bool(data["started"]), HoldingsReport.model_validate(data["report"])

    async def broadcast_peers(self) -> None:
        """Tell every live agent every live agent's current transport address."""
        peers = [self.agents[n].peer for n in self.alive()]
        await asyncio.gather(*(self.request(n, SetPeers(req=0, peers=peers)) for n in self.alive()))

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for h in self.agents.values():
            h.writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # every handler sees its connection end and returns (agents that outlive the controller, as
        # supervised ones do, would otherwise leave them to be cancelled with the loop, unobserved)
        if self._handlers:
            _, late = await asyncio.wait(set(self._handlers), timeout=5)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
