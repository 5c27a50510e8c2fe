"""Controller side of the runtime: the agents' registry and membership, request/reply over the
control channel, the stream of agent events, and loss detection.

:class:`Cluster` listens on 127.0.0.1, or the address ``runtime.controller_bind`` resolves to
(:func:`lambdascale.runtime.launcher.controller_addresses`); launchers tell each agent the
advertised address.
Agents register, then every request (``await cluster.request(node, Msg(req=0, ...))``) is matched
to its :class:`~lambdascale.runtime.messages.Reply` by id. Unsolicited reports (chunk held /
corrupt, send failed) and :class:`NodeLost` go to every queue open from :meth:`Cluster.subscribe`
(each multicast reads its own, so multicasts of different models run side by side).

Membership (:mod:`lambdascale.membership`, docs/arch/runtime.md "Membership"): a node is alive,
suspect (missed heartbeats: it keeps what it runs, gets nothing new), dead (silent past
``heartbeat_misses`` periods, or its channel closed) or rejoining (a new incarnation registered;
alive once its holdings are in and its peers know its address). Every registration gets an
incarnation above every earlier one of that node (:class:`~lambdascale.runtime.messages.Welcome`)
and every message of a session carries it: a message whose incarnation is not the node's current
one, or that arrives after its incarnation was declared dead, is fenced off (counted, logged once
per incarnation) and reaches no request, no subscriber and no state. Pending requests to a node
that dies fail with :class:`NodeLostError` at once, never hang. :meth:`watch` hands every change
of state to a listener (the serving core drops a dead node's holdings and units with it).

Every control channel opens with the cluster secret's challenge-response
(:mod:`lambdascale.transfer.auth`) before a message is read; a refused one is logged once with
the peer's address and closed, and the listener goes on. A ``Register`` for a node that is up is
refused, unless it is the same node's new incarnation proving the secret: the process that held
that incarnation re-dialing (it names the incarnation), or a new process when the live one does
not answer a probe (a restarted agent whose old process died without closing its channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lambdascale.errors import LambdaScaleError
from lambdascale.membership import MemberState, next_incarnation, state_for_silence
from lambdascale.runtime.messages import (
    ChunkCorrupt,
    ChunkHeld,
    ControlError,
    CopyBackModel,
    EvictModel,
    GetHoldings,
    HoldingsReport,
    Heartbeat,
    Ping,
    Register,
    Reply,
    SendFailed,
    SetPeers,
    Welcome,
    read_msg,
    write_msg,
)
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import AuthError, Channel, new_secret, peer_name, server_handshake
from lambdascale.transfer.base import PeerInfo
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger(__name__)

#: kept for importers: a node's state is a :class:`~lambdascale.membership.MemberState`
NodeStatus = MemberState
#: states in which a node is a member (requests go to it; what it runs keeps running)
_MEMBER = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.REJOINING)


class NodeLostError(LambdaScaleError):
    """An agent died or went silent while the controller needed it."""


class AgentRequestError(LambdaScaleError):
    """An agent answered a request with an error (its message says which node and why)."""


@dataclass(frozen=True)
class NodeLost:
    """Event: ``node``'s incarnation ``incarnation`` is gone (connection closed or heartbeats missed)."""

    node: int
    reason: str
    incarnation: int = 0
    type: str = "node_lost"


@dataclass(frozen=True)
class MemberEvent:
    """A node's state changed (what :meth:`Cluster.watch` listeners get and :attr:`Cluster.history` keeps)."""

    at: float          # monotonic seconds
    node: int
    incarnation: int
    state: MemberState
    reason: str = ""


@dataclass
class AgentHandle:
    node: int
    pid: int
    peer: PeerInfo
    writer: asyncio.StreamWriter
    incarnation: int = 1
    status: MemberState = MemberState.REJOINING
    last_seen: float = field(default_factory=time.monotonic)
    joined_at: float = field(default_factory=time.monotonic)
    dead_at: float | None = None
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
        #: highest incarnation given to each node (it only grows, across deaths)
        self.incarnations: dict[int, int] = {}
        #: what each node reported holding when its current incarnation registered
        self.join_reports: dict[int, HoldingsReport] = {}
        #: messages fenced off per node (an earlier incarnation's, or sent after its death)
        self.fenced: dict[int, int] = {}
        #: every change of state, oldest first (bounded; status, benchmarks and tests read it)
        self.history: deque[MemberEvent] = deque(maxlen=10_000)
        #: called with (node, incarnation, message) for every message that passed the fence (tests)
        self.message_hooks: list[Callable[[int, int, Any], None]] = []
        self._listeners: list[Callable[[MemberEvent], None]] = []
        self._fence_logged: set[tuple[int, int]] = set()
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
        self._tasks: set[asyncio.Task] = set()  # admissions of new incarnations
        self._monitor: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> tuple[str, int]:
        """Listen for agents; returns the (host, port) to give launchers."""
        try:
            self._server = await asyncio.start_server(self._on_agent, self.host, self.port, ssl=self.tls,
                                                      ssl_handshake_timeout=self._handshake_timeout_s if self.tls else None)
        except OSError as e:
            raise LambdaScaleError(f"the controller cannot listen on {self.host}:{self.port} "
                                   f"(runtime.controller_bind / controller_port): {e.strerror or e}") from None
        self._monitor = self._spawn(self._watch_heartbeats(), "heartbeat monitor")
        log.info("controller listening for agents on %s:%d (agents dial %s:%d; %s)", self.host, self.address[1],
                 *self.address, "mutual TLS" if self.tls else "no TLS")
        return self.address

    def _spawn(self, coro: Any, what: str) -> asyncio.Task:
        """A task of the controller's: an error is logged once with ``what``, never left unobserved."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("controller: %s failed: %r", what, t.exception(), exc_info=t.exception())
        task.add_done_callback(done)
        return task

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

    def watch(self, listener: Callable[[MemberEvent], None]) -> None:
        """Call ``listener`` (synchronously, on the loop) with every change of a node's state."""
        self._listeners.append(listener)

    def _publish(self, ev: ClusterEvent) -> None:
        for q in self._subscribers:
            q.put_nowait(ev)

    def _member_event(self, h: AgentHandle, reason: str = "") -> None:
        ev = MemberEvent(time.monotonic(), h.node, h.incarnation, h.status, reason)
        self.history.append(ev)
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:  # noqa: BLE001 - one listener's bug must not stop membership
                log.exception("controller: membership listener failed on %s", ev)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "cluster not started"
        return self.advertise, self._server.sockets[0].getsockname()[1]

    def alive(self) -> list[int]:
        """Members that run work: alive and suspect nodes (a suspect keeps what it runs)."""
        return sorted(n for n, a in self.agents.items() if a.status in (MemberState.ALIVE, MemberState.SUSPECT))

    def healthy(self) -> list[int]:
        """Nodes that may take new work: alive, not suspect."""
        return sorted(n for n, a in self.agents.items() if a.status is MemberState.ALIVE)

    def state(self, node: int) -> MemberState:
        h = self.agents.get(node)
        return MemberState.DEAD if h is None else h.status

    def incarnation(self, node: int) -> int:
        """The node's current incarnation (0: it never registered)."""
        h = self.agents.get(node)
        return 0 if h is None else h.incarnation

    def is_current(self, node: int, incarnation: int) -> bool:
        """Whether ``incarnation`` of ``node`` is still a member (not dead, not superseded)."""
        h = self.agents.get(node)
        return h is not None and h.incarnation == incarnation and h.status in (MemberState.ALIVE, MemberState.SUSPECT)

    async def wait_for_agents(self, nodes: list[int], timeout: float | None = None) -> None:
        """Wait until every node in ``nodes`` is alive; a clear error names the missing ones."""
        timeout = self.settings.register_timeout_s if timeout is None else timeout

        async def ready() -> None:
            async with self._registered:
                await self._registered.wait_for(lambda: all(n in self.alive() for n in nodes))

        try:
            await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(nodes) - set(self.alive()))
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
            handle = None if self._closing else await self._admit(first, writer, peer)
            if handle is None:
                writer.close()
                return
            await write_msg(writer, Welcome(incarnation=handle.incarnation))
            self._spawn(self._join(handle, first), f"admission of node {handle.node} incarnation {handle.incarnation}")
            while True:
                msg = await read_msg(reader)
                if msg is None:
                    break
                self._deliver(handle, msg)
        except (ConnectionError, ControlError) as e:
            reason = f"control channel error: {e}"
        finally:
            if handle is not None:
                self._mark_dead(handle, reason)

    async def _admit(self, reg: Register, writer: asyncio.StreamWriter, peer: str) -> AgentHandle | None:
        """The handle of the registering process's new incarnation, or None (refused, logged)."""
        live = self.agents.get(reg.node)
        if live is not None and live.status in _MEMBER:
            if reg.incarnation and reg.incarnation == live.incarnation:
                # the process holding that incarnation dialed again: its old channel is dead to it
                self._mark_dead(live, f"superseded: it registered again from {peer}")
            elif await self._answers(live):
                # one registration per live node, so no one takes over a node that serves
                log.warning("controller: refused %s's registration as node %d: node %d is up (pid %d, incarnation %d)",
                            peer, reg.node, reg.node, live.pid, live.incarnation)
                return None
            else:
                self._mark_dead(live, f"a new process registered from {peer} and incarnation {live.incarnation} "
                                      "did not answer a probe")
        inc = next_incarnation(self.incarnations.get(reg.node, 0), reg.incarnation)
        self.incarnations[reg.node] = inc
        handle = AgentHandle(node=reg.node, pid=reg.pid, peer=reg.peer, writer=writer, incarnation=inc)
        self.agents[reg.node] = handle
        if reg.holdings is not None:
            self.join_reports[reg.node] = reg.holdings
        else:
            self.join_reports.pop(reg.node, None)
        self._member_event(handle, f"registered from {peer} (pid {reg.pid})")
        return handle

    async def _answers(self, h: AgentHandle) -> bool:
        """Probe a live node (a Ping within two heartbeat periods)."""
        try:
            await self.request(h.node, Ping(req=0), timeout=2 * self.settings.heartbeat_s)
            return True
        except (NodeLostError, AgentRequestError):
            return False

    async def _join(self, h: AgentHandle, reg: Register) -> None:
        """Admit a new incarnation: it learns every member's address, then it is alive and the
        members learn its address (in the background: a suspect member must not hold it up)."""
        nodes = sorted(set(self.alive()) | {h.node})
        peers = [self.agents[n].peer for n in nodes]
        try:
            await self.request(h.node, SetPeers(req=0, peers=peers))
        except (NodeLostError, AgentRequestError) as e:
            log.warning("controller: node %d incarnation %d did not take its peers: %s", h.node, h.incarnation, e)
        if h.status is not MemberState.REJOINING:
            return  # died while joining
        h.status = MemberState.ALIVE
        h.last_seen = time.monotonic()
        rejoin = h.incarnation > 1
        log.info("controller: node %d %s as incarnation %d (pid %d)", h.node, "rejoined" if rejoin else "joined",
                 h.incarnation, h.pid)
        self._member_event(h, "rejoined" if rejoin else "joined")
        async with self._registered:
            self._registered.notify_all()

        async def tell(n: int) -> None:
            with contextlib.suppress(NodeLostError, AgentRequestError):
                await self.request(n, SetPeers(req=0, peers=[h.peer]))
        await asyncio.gather(*(tell(n) for n in self.alive() if n != h.node))

    def _fence(self, h: AgentHandle, msg: Any, why: str) -> None:
        self.fenced[h.node] = self.fenced.get(h.node, 0) + 1
        key = (h.node, getattr(msg, "inc", h.incarnation))
        if key not in self._fence_logged:
            self._fence_logged.add(key)
            log.warning("controller: fenced off a %s from node %d (%s); later ones of that incarnation are "
                        "dropped silently", type(msg).__name__, h.node, why)

    def _deliver(self, h: AgentHandle, msg: Any) -> None:
        """One message read from ``h``'s channel: through the fence, then to its request or subscribers."""
        inc = getattr(msg, "inc", None)
        if h.status is MemberState.DEAD:
            self._fence(h, msg, f"incarnation {h.incarnation} was declared dead")
            return
        if inc is not None and inc != h.incarnation:
            self._fence(h, msg, f"it carries incarnation {inc}, the node is at {h.incarnation}")
            return
        h.last_seen = time.monotonic()
        if h.status is MemberState.SUSPECT:  # it refuted the suspicion
            h.status = MemberState.ALIVE
            self._member_event(h, "heard again")
        for hook in self.message_hooks:
            hook(h.node, h.incarnation, msg)
        if isinstance(msg, Reply):
            fut = h.pending.pop(msg.req, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, (ChunkHeld, ChunkCorrupt, SendFailed)):
            self._publish(msg)
        else:
            log.warning("node %d sent an unexpected %s; ignored", h.node, type(msg).__name__)

    def _mark_dead(self, handle: AgentHandle, reason: str) -> None:
        if handle.status is MemberState.DEAD:
            return
        handle.status = MemberState.DEAD
        handle.dead_at = time.monotonic()
        for fut in handle.pending.values():
            if not fut.done():
                fut.set_exception(NodeLostError(f"node {handle.node} lost: {reason}"))
        handle.pending.clear()
        handle.writer.close()
        if self.agents.get(handle.node) is handle:
            self.join_reports.pop(handle.node, None)
        log.warning("controller: node %d incarnation %d declared dead: %s", handle.node, handle.incarnation, reason)
        self._publish(NodeLost(handle.node, reason, handle.incarnation))
        self._member_event(handle, reason)

    async def _watch_heartbeats(self) -> None:
        hb, misses = self.settings.heartbeat_s, self.settings.heartbeat_misses
        while True:
            await asyncio.sleep(hb / 2)
            now = time.monotonic()
            for h in list(self.agents.values()):
                if h.status not in (MemberState.ALIVE, MemberState.SUSPECT):
                    continue
                silence = now - h.last_seen
                st = state_for_silence(silence, hb, misses)
                if st is MemberState.DEAD:
                    self._mark_dead(h, f"no heartbeat for {silence:.1f}s (limit {hb * misses:.1f}s)")
                elif st is MemberState.SUSPECT and h.status is MemberState.ALIVE:
                    h.status = MemberState.SUSPECT
                    self._member_event(h, f"no heartbeat for {silence:.1f}s")

    async def request(self, node: int, msg: Any, timeout: float | None = None) -> dict[str, Any]:
        """Send a request (its ``req`` is assigned here) and return the reply's data."""
        h = self.agents.get(node)
        if h is None or h.status not in _MEMBER:
            raise NodeLostError(f"node {node} is not up")
        msg = msg.model_copy(update={"req": next(self._req_ids)})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        h.pending[msg.req] = fut
        try:
            async with h.lock:
                await write_msg(h.writer, msg)
        except (ConnectionError, RuntimeError) as e:
            h.pending.pop(msg.req, None)
            self._mark_dead(h, f"cannot write to control channel: {e}")
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

    async def broadcast_peers(self, extra: int | None = None) -> None:
        """Tell every live agent (and ``extra``, a joining one) every such agent's transport address."""
        nodes = sorted(set(self.alive()) | ({extra} if extra is not None else set()))
        peers = [self.agents[n].peer for n in nodes]
        await asyncio.gather(*(self.request(n, SetPeers(req=0, peers=peers)) for n in nodes))

    async def close(self) -> None:
        self._closing = True  # a handshake in progress now is not admitted
        for t in list(self._tasks):  # the heartbeat monitor and admissions in progress
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()  # no new connection (agents re-dial when their channel ends)
        for h in self.agents.values():
            h.writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        # every handler sees its connection end and returns (agents that outlive the controller, as
        # supervised ones do, would otherwise leave them to be cancelled with the loop, unobserved)
        if self._handlers:
            _, late = await asyncio.wait(set(self._handlers), timeout=5)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
