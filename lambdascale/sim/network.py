"""Flow-level network: transfers are flows over links that share bandwidth max-min fairly.

A link is one direction of one resource (a NIC's send side, a NIC's receive side, a GPU's PCIe
link, a node's NVLink switch, a node's SSD). A flow crosses a path of links; its rate is the
max-min fair share (progressive filling): repeatedly find the link whose remaining capacity split
over its unfrozen flows is smallest, give those flows that share, freeze them, subtract. Rates
change only when a flow starts or ends, so between such events every flow progresses linearly and
the next completion is exact: ``remaining / rate``. A flow occupies its links while its bytes
move; it *lands* a fixed latency (``latency_s``) after its last byte left (as ``pipe.play``
models a send: the link is busy ``bytes / bandwidth``, the chunk arrives ``latency`` later).

With one flow per link (uncontended), a flow of ``b`` bytes over links of capacities ``c_i`` takes
``latency + b / min(c_i)``: the same figure a round-based player computes, which a test checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable

from lambdascale.sim.events import EventHandle, EventLoop, Priority

LinkId = Hashable


@dataclass(eq=False)
class Flow:
    """One transfer in flight. ``sent`` (optional) is called when its last byte has left (its
    links are free again), ``done`` when it lands, ``latency`` later."""

    path: tuple[LinkId, ...]
    nbytes: float
    done: Callable[["Flow"], None]
    tag: object = None
    latency: float = 0.0
    sent: Callable[["Flow"], None] | None = None
    remaining: float = 0.0
    rate: float = 0.0
    started: float = 0.0
    active: bool = False
    cap: float = math.inf  # most bytes/s this flow may take (its instance's NICs, one load's PCIe share)


@dataclass
class Network:
    """Links with capacities (bytes/s) and the flows crossing them, driven by an :class:`EventLoop`."""

    loop: EventLoop
    capacity: dict[LinkId, float] = field(default_factory=dict)
    latency_s: float = 0.0
    flows: list[Flow] = field(default_factory=list)
    bytes_moved: float = 0.0
    _last: float = 0.0
    _next: EventHandle | None = None

    def add_link(self, link: LinkId, bytes_per_s: float) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"link {link!r}: capacity must be positive, got {bytes_per_s}")
        self.capacity[link] = float(bytes_per_s)

    def start(self, path: tuple[LinkId, ...], nbytes: float, done: Callable[[Flow], None],
              tag: object = None, latency_s: float | None = None,
              sent: Callable[[Flow], None] | None = None, cap: float | None = None) -> Flow:
        """Start a flow now; ``sent(flow)`` fires when its last byte left, ``done(flow)`` when it
        lands ``latency_s`` (default: the network's) later. ``cap`` bounds its rate in bytes/s
        (as a private link of that capacity only it crosses)."""
        for link in path:
            if link not in self.capacity:
                raise KeyError(f"unknown link {link!r}")
        lat = self.latency_s if latency_s is None else latency_s
        if cap is not None and not cap > 0:
            raise ValueError(f"flow cap must be positive, got {cap}")
        f = Flow(tuple(path), float(nbytes), done, tag, latency=lat, sent=sent, remaining=float(nbytes),
                 cap=math.inf if cap is None else float(cap))
        self._activate(f)
        return f

    def _land(self, f: Flow) -> None:
        if f.sent is not None:
            f.sent(f)
        self.loop.after(f.latency, Priority.TRANSFER, f.done, f)

    def _activate(self, f: Flow) -> None:
        self._advance()
        f.started = self.loop.now()
        if f.remaining <= 0 or not f.path:
            # Nothing to move (zero bytes or a local hand-off): lands after its latency.
            self.loop.after(0.0, Priority.TRANSFER, self._land, f)
            return
        f.active = True
        self.flows.append(f)
        self._reshare()

    def _advance(self) -> None:
        """Move every flow forward to now at its current rate."""
        now = self.loop.now()
        dt = now - self._last
        if dt > 0:
            for f in self.flows:
                moved = f.rate * dt
                f.remaining -= moved
                self.bytes_moved += moved
        self._last = now

    def _reshare(self) -> None:
        """Progressive filling, then schedule the earliest completion."""
        flows = self.flows
        for f in flows:
            f.rate = 0.0
        if flows:
            cap = {}
            users: dict[LinkId, list[Flow]] = {}
            for f in flows:
                for link in f.path:
                    users.setdefault(link, []).append(f)
            for link in users:
                cap[link] = self.capacity[link]
            frozen: set[int] = set()
            live = {link: len(u) for link, u in users.items()}
            capped = sorted((f for f in flows if f.cap < math.inf), key=lambda f: f.cap)
            while len(frozen) < len(flows):
                best, share = None, math.inf
                for link, n in live.items():
                    if n > 0:
                        s = cap[link] / n
                        if s < share:
                            best, share = link, s
                # a flow's own cap is a link only it crosses: it binds first when it is the smallest share
                while capped and id(capped[0]) in frozen:
                    capped.pop(0)
                if capped and capped[0].cap < share:
                    group: list[Flow] = [capped.pop(0)]
                    share = group[0].cap
                elif best is None:
                    break
                else:
                    group = users[best]
                for f in group:
                    if id(f) in frozen:
                        continue
                    frozen.add(id(f))
                    f.rate = share
                    for link in f.path:
                        cap[link] -= share
                        live[link] -= 1
        self.loop.cancel(self._next)
        self._next = None
        if flows:
            t = min(self.loop.now() + (f.remaining / f.rate if f.rate > 0 else math.inf) for f in flows)
            if math.isfinite(t):
                self._next = self.loop.schedule(t, Priority.TRANSFER, self._complete)

    def _complete(self) -> None:
        self._next = None
        self._advance()
        # A flow is done when what is left would take under a nanosecond (float residue).
        finished = [f for f in self.flows if f.remaining <= max(1e-9 * f.nbytes, f.rate * 1e-12)]
        if not finished:  # float residue moved the earliest completion a hair later
            self._reshare()
            return
        for f in finished:
            self.flows.remove(f)
            self.bytes_moved += max(0.0, f.remaining)
            f.remaining = 0.0
            f.active = False
        self._reshare()
        for f in finished:
            self._land(f)
