"""Multicast runs: a :class:`~lambdascale.pipe.multicast.MulticastPlan` played on the flow network.

Each send is a flow from the sender's NIC to the receiver's NIC, so concurrent scale-outs and
copy-backs share links. Two modes, as ``pipe.play``: round-synchronous (the reference) and
chunk-level without barriers (``sim.multicast_mode``). A run knows nothing of instances: it
reports each chunk landing on a node (``on_chunk(node, chunk)``) and its end (``on_done()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, cast

from lambdascale.pipe.multicast_plan import MulticastPlan
from lambdascale.sim.network import Flow, Network


class MulticastRun:
    """Plays a :class:`MulticastPlan` round by round on the flow network.

    Round ``t`` starts when every transfer of round ``t-1`` has landed (the reference's
    round-synchronous execution, ``pipe.play(mode="round")``). ``order`` maps the plan's
    endpoints to nodes; ``chunk_bytes`` is each chunk's size, ``latency_s`` a send's latency,
    ``cap`` the most bytes/s one send may take (the instance's NICs, ``ClusterSpec.instance_net_Bps``).
    """

    def __init__(self, net: Network, plan: MulticastPlan, order: tuple[int, ...], chunk_bytes: Sequence[float],
                 latency_s: float, on_chunk: Callable[[int, int], None], on_done: Callable[[], None],
                 cap: float | None = None) -> None:
        self.net, self.plan, self.order, self.cap = net, plan, order, cap
        self.chunk_bytes, self.latency_s = chunk_bytes, latency_s
        self.on_chunk, self.on_done = on_chunk, on_done
        self.r = 0
        self.outstanding = 0

    def start(self) -> None:
        self.start_round()

    def start_round(self) -> None:
        while self.r < len(self.plan.rounds) and not self.plan.rounds[self.r]:
            self.r += 1
        if self.r >= len(self.plan.rounds):
            self.on_done()
            return
        sends = self.plan.rounds[self.r]
        self.r += 1
        self.outstanding = len(sends)
        for snd in sends:
            a, b = self.order[snd.src], self.order[snd.dst]
            self.net.start((("out", a), ("in", b)), self.chunk_bytes[snd.chunk], self._landed,
                           tag=(b, snd.chunk), latency_s=self.latency_s, cap=self.cap)

    def _landed(self, f: Flow) -> None:
        node, chunk = cast(tuple[int, int], f.tag)
        self.on_chunk(node, chunk)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.start_round()


class ChunkMulticastRun(MulticastRun):
    """Chunk-level play, no round barrier (``pipe.play(mode="chunk")``): each NIC sends and
    receives in the plan's order, and a send starts once its sender holds the chunk and both NIC
    sides finished their previous transfer. Sends are flows, so they share links with anything
    else moving at the time."""

    def start(self) -> None:
        sends = [snd for rnd in self.plan.rounds for snd in rnd]
        self.sends = sends
        self.left = len(sends)
        if not sends:
            self.on_done()
            return
        last_out: dict[int, int] = {}
        last_in: dict[int, int] = {}
        self.waits = [0] * len(sends)
        self.after_out: dict[int, int] = {}  # send -> next send on the same sender NIC
        self.after_in: dict[int, int] = {}   # send -> next send on the same receiver NIC
        self.want: dict[tuple[int, int], list[int]] = {}  # (endpoint, chunk) -> sends waiting for it
        src_set = set(self.plan.sources)
        self.have: set[tuple[int, int]] = set()
        for i, snd in enumerate(sends):
            if snd.src in last_out:
                self.after_out[last_out[snd.src]] = i
                self.waits[i] += 1
            if snd.dst in last_in:
                self.after_in[last_in[snd.dst]] = i
                self.waits[i] += 1
            last_out[snd.src] = i
            last_in[snd.dst] = i
            if snd.src not in src_set:
                self.waits[i] += 1
                self.want.setdefault((snd.src, snd.chunk), []).append(i)
        for i in range(len(sends)):
            if self.waits[i] == 0:
                self._go(i)

    def _ready(self, i: int) -> None:
        self.waits[i] -= 1
        if self.waits[i] == 0:
            self._go(i)

    def _go(self, i: int) -> None:
        snd = self.sends[i]
        a, b = self.order[snd.src], self.order[snd.dst]
        self.net.start((("out", a), ("in", b)), self.chunk_bytes[snd.chunk], self._chunk_landed,
                       tag=i, latency_s=self.latency_s, sent=self._sent, cap=self.cap)

    def _sent(self, f: Flow) -> None:
        i = cast(int, f.tag)
        for nxt in (self.after_out.get(i), self.after_in.get(i)):
            if nxt is not None:
                self._ready(nxt)

    def _chunk_landed(self, f: Flow) -> None:
        snd = self.sends[cast(int, f.tag)]
        key = (snd.dst, snd.chunk)
        if key not in self.have:
            self.have.add(key)
            self.on_chunk(self.order[snd.dst], snd.chunk)
            for j in self.want.pop(key, ()):
                self._ready(j)
        self.left -= 1
        if self.left == 0:
            self.on_done()


__all__ = ["ChunkMulticastRun", "MulticastRun"]
