"""Schedule player: replay a multicast plan against link bandwidths and latencies.

Link model (``Links``): every NIC (one per node, or one per GPU with ``nics_per_node``) is
full duplex with ``nic_send_bps`` and ``nic_recv_bps`` bytes/s and a one-way ``latency_s``; intra-node (GPU to GPU) links have
``intra_bps`` and ``intra_latency_s``. A network send of ``x`` bytes from node a to node b
occupies a's send side and b's receive side for ``x / min(send_a, recv_b)`` seconds and lands
``latency_s`` after it leaves. Per-node overrides model heterogeneous NICs.

Modes (``PlayMode``):

* ``round``: round-synchronous, as the reference runs: round t starts when every transfer of
  round t-1 has landed, and lasts as long as its slowest transfer.
* ``chunk``: chunk-level, no barrier. Each send keeps the plan's per-NIC (per-link) order and
  starts as soon as the sender holds the chunk and both NIC sides (or the intra link) are free.

Both modes replay the same sends; ``chunk`` can only be earlier (a test checks it). Times are
seconds from the start of the multicast (sources hold everything at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

from lambdascale.pipe.multicast_plan import MulticastPlan, PlanError, Send, SendKind
from lambdascale.pipe.pipelines import PipelinePlanner


class PlayMode(str, Enum):
    ROUND = "round"
    CHUNK = "chunk"


@dataclass(frozen=True)
class Links:
    """Bandwidths in bytes/s, latencies in seconds; overrides keyed by node id."""

    nic_send_bps: float = 50e9
    nic_recv_bps: float = 50e9
    latency_s: float = 5e-6
    intra_bps: float = 300e9
    intra_latency_s: float = 2e-6
    send_override: Mapping[int, float] = field(default_factory=dict)
    recv_override: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nic_send_bps", "nic_recv_bps", "intra_bps"):
            v = getattr(self, name)
            if not v > 0:
                raise PlanError(f"Links.{name} must be > 0 bytes/s, got {v}")
        for name in ("latency_s", "intra_latency_s"):
            v = getattr(self, name)
            if not v >= 0:
                raise PlanError(f"Links.{name} must be >= 0 s, got {v}")
        for name in ("send_override", "recv_override"):
            for node, v in getattr(self, name).items():
                if not v > 0:
                    raise PlanError(f"Links.{name}[{node}] must be > 0 bytes/s, got {v}")

    def send_bps(self, node: int) -> float:
        return self.send_override.get(node, self.nic_send_bps)

    def recv_bps(self, node: int) -> float:
        return self.recv_override.get(node, self.nic_recv_bps)


@dataclass(frozen=True)
class PlayResult:
    """Times (s) from the start. Keys are receiver endpoints (``chunk``) or nodes (``block``)."""

    mode: PlayMode
    #: endpoint -> arrival time of each chunk (index = chunk id)
    chunk_arrival: Mapping[int, tuple[float, ...]]
    #: receiver node -> time all its GPUs hold each block
    block_arrival: Mapping[int, tuple[float, ...]]
    #: receiver node -> time it holds the whole model
    node_full: Mapping[int, float]
    #: time every block first exists whole on some receiver node
    all_blocks_time: float
    #: time the first execution pipeline (or a solo node) can serve; inf without receivers
    first_pipeline_time: float
    #: time every receiver holds everything
    completion_time: float
    #: (time, instances) each time the number of serving instances among receivers changes
    instances_timeline: tuple[tuple[float, int], ...]
    #: (time, sizes of the active pipelines, solo nodes) each time the serving set changes
    serving_timeline: tuple[tuple[float, tuple[int, ...], int], ...] = ()


def _chunk_sizes(chunk_bytes: int | float | Sequence[float], n_chunks: int) -> list[float]:
    if isinstance(chunk_bytes, (int, float)):
        if not chunk_bytes > 0:
            raise PlanError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        return [float(chunk_bytes)] * n_chunks
    sizes = [float(x) for x in chunk_bytes]
    if len(sizes) != n_chunks:
        raise PlanError(f"chunk_bytes has {len(sizes)} entries, the plan has {n_chunks} chunks")
    if any(not x > 0 for x in sizes):
        raise PlanError("every chunk_bytes entry must be > 0")
    return sizes


def play(
    plan: MulticastPlan,
    chunk_bytes: int | float | Sequence[float],
    links: Links | None = None,
    mode: PlayMode | str = PlayMode.ROUND,
) -> PlayResult:
    """Replay ``plan``; ``chunk_bytes`` is one size for all chunks or one per chunk."""
    links = links or Links()
    try:
        mode = PlayMode(mode)
    except ValueError:
        raise PlanError(f"unknown play mode {mode!r}; choose round or chunk") from None
    size = _chunk_sizes(chunk_bytes, plan.n_chunks)
    K = plan.n_chunks
    G = plan.gpus_per_node
    have: dict[int, list[float]] = {}
    for s in plan.sources:
        for e in plan.endpoints_of(s):
            have[e] = [0.0] * K
    for e in plan.receivers:
        have[e] = [math.inf] * K

    def cost(snd: Send) -> tuple[float, float]:
        """(occupancy of the link, landing delay after the start)."""
        if snd.kind is SendKind.NETWORK:
            bw = min(links.send_bps(snd.src // G), links.recv_bps(snd.dst // G))
            busy = size[snd.chunk] / bw
            return busy, busy + links.latency_s
        busy = size[snd.chunk] / links.intra_bps
        return busy, busy + links.intra_latency_s

    if mode is PlayMode.ROUND:
        t0 = 0.0
        for rnd in plan.rounds:
            end = t0
            landed = []
            for snd in rnd:
                _, delay = cost(snd)
                landed.append((snd.dst, snd.chunk, t0 + delay))
                end = max(end, t0 + delay)
            for e, c, t in landed:
                if t < have[e][c]:
                    have[e][c] = t
            t0 = end
    else:
        out_free: dict[int, float] = {}
        in_free: dict[int, float] = {}
        link_free: dict[tuple[int, int], float] = {}
        # Plan order is a valid topological order: a send depends only on earlier rounds.
        for rnd in plan.rounds:
            landed = []
            for snd in rnd:
                busy, delay = cost(snd)
                ready = have[snd.src][snd.chunk]
                if snd.kind is SendKind.NETWORK:
                    # a NIC sits on one GPU: key its send and receive sides by endpoint
                    a, b = snd.src, snd.dst
                    start = max(ready, out_free.get(a, 0.0), in_free.get(b, 0.0))
                    out_free[a] = start + busy
                    in_free[b] = start + busy
                else:
                    key = (snd.src, snd.dst)
                    start = max(ready, link_free.get(key, 0.0))
                    link_free[key] = start + busy
                landed.append((snd.dst, snd.chunk, start + delay))
            for e, c, t in landed:
                if t < have[e][c]:
                    have[e][c] = t

    B = plan.n_blocks
    lay = plan.chunk_layout  # a block lands when every chunk overlapping it has landed
    block_arrival: dict[int, tuple[float, ...]] = {}
    for n in plan.receiver_nodes:
        bt = [0.0] * B
        for e in plan.endpoints_of(n):
            row = have[e]
            for b in range(B):
                for c in lay.chunks_of_block(b):
                    if row[c] > bt[b]:
                        bt[b] = row[c]
        block_arrival[n] = tuple(bt)
    node_full = {n: max(bt) for n, bt in block_arrival.items()}
    all_blocks = (
        max(min(block_arrival[n][b] for n in plan.receiver_nodes) for b in range(B)) if plan.receiver_nodes else 0.0
    )
    first, timeline, serving = _pipeline_timeline(plan.receiver_nodes, block_arrival, B)
    return PlayResult(
        mode=mode,
        chunk_arrival={e: tuple(have[e]) for e in plan.receivers},
        block_arrival=block_arrival,
        node_full=node_full,
        all_blocks_time=all_blocks,
        first_pipeline_time=first,
        completion_time=max(node_full.values(), default=0.0),
        instances_timeline=timeline,
        serving_timeline=serving,
    )


def _pipeline_timeline(
    nodes: Sequence[int], block_arrival: Mapping[int, Sequence[float]], n_blocks: int
) -> tuple[float, tuple[tuple[float, int], ...], tuple[tuple[float, tuple[int, ...], int], ...]]:
    """Feed block completions in time order to the incremental planner; events at the same time
    are all applied before the state at that time is recorded."""
    planner = PipelinePlanner(nodes, n_blocks)
    events = sorted((t, n, b) for n, bt in block_arrival.items() for b, t in enumerate(bt))
    first = math.inf
    timeline: list[tuple[float, int]] = []
    serving: list[tuple[float, tuple[int, ...], int]] = []
    last = planner.plan.instances
    last_serving: tuple[tuple[int, ...], int] = ((), 0)
    for i, (t, n, b) in enumerate(events):
        planner.on_block(n, b)
        if i + 1 < len(events) and events[i + 1][0] == t:
            continue
        inst = planner.plan.instances
        if inst != last:
            timeline.append((t, inst))
            last = inst
        now = (tuple(p.size for p in planner.plan.active), len(planner.plan.solo))
        if now != last_serving:
            serving.append((t, *now))
            last_serving = now
        if inst > 0 and first == math.inf:
            first = t
    return first, tuple(timeline), tuple(serving)
