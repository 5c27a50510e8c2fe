"""Multicast schedules: which endpoint sends which chunk to whom, round by round.

A model of ``B`` execution blocks is cut into ``K`` transfer chunks; a
:class:`~lambdascale.pipe.layout.ChunkLayout` says which chunks overlap which block (default
:meth:`~lambdascale.pipe.layout.ChunkLayout.uniform`: chunk ``c`` belongs to block ``c * B // K``;
a checkpoint's equal-byte layout lets one chunk overlap two blocks). Nodes ``0..N-1`` (sources included) exchange
chunks in synchronous *rounds*. Round ``t`` (1-based) is ``plan.rounds[t - 1]``; a chunk sent in
round ``t`` is held from *tick* ``t`` on (the end of round ``t``); sources hold everything at tick 0.

Rules every plan obeys (``validate_plan`` checks them, the property tests call it):

* nobody sends a chunk it does not hold at the start of the round;
* per-link rule: each node's NIC sends at most one chunk and receives at most one chunk per round
  (with one GPU per node this is the classic per-node rule), and each directed intra-node link
  carries at most one chunk per round;
* every receiver ends with every chunk.

Endpoint ids. With ``gpus_per_node = G`` the plan's endpoints are GPUs: GPU ``g`` of node ``n`` is
endpoint ``n * G + g``; with ``G = 1`` endpoint ids equal node ids. By default GPU 0 of a node owns
its only NIC: every network send leaves from and lands on GPU 0, which fans each chunk out to the
node's other GPUs over intra-node links in the following round. A chunk thus crosses the network
once per node. With ``nics_per_node = L`` (one NIC per GPU on GPUs 0..L-1, as on InfiniBand GPU
servers) the chunk order is striped over L lanes: lane j is a full schedule of its chunks over NIC j
of every node, and the GPU that received a chunk fans it out.

Algorithms (``Algo``):

* ``binomial``: the binomial pipeline (hypercube exchange along dimension ``t mod l``, highest
  missing chunk first, the source emits chunk ``t`` in round ``t``). Nodes beyond the power of
  two form a *team* with a hypercube node: the two members alternate roles each round (one
  receives from outside and forwards inside, the other sends outside and receives inside), so
  the team behaves towards the hypercube like one node. With several sources, receivers are split
  into one group per source and each source sends the blocks dealt to it first (round-robin deal
  balanced by chunk count, rotated order), so groups receive complementary blocks first.
* ``faasnet``: FaaSNet's binary tree, chunk-pipelined; each node forwards to its two children
  alternately (one send per round), lowest missing chunk first.
* ``ring``: NCCL-style chunked ring (chain) broadcast.
* ``direct``: the source sends every chunk to every receiver itself (chunk-major interleaving,
  which is what parallel unicast streams sharing the source NIC amount to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Mapping, NamedTuple, Sequence

from lambdascale.errors import LambdaScaleError
from lambdascale.pipe.layout import ChunkLayout, resolve_layout


class Algo(str, Enum):
    """Multicast algorithm."""

    BINOMIAL = "binomial"
    FAASNET = "faasnet"
    RING = "ring"
    DIRECT = "direct"


class SendKind(str, Enum):
    """Which kind of link a send uses."""

    NETWORK = "network"
    INTRA = "intra"


class Send(NamedTuple):
    """One chunk moving over one link in one round (endpoint ids, see the module doc)."""

    src: int
    dst: int
    chunk: int
    kind: SendKind = SendKind.NETWORK


class PlanError(LambdaScaleError, ValueError):
    """Invalid planner input; the message names the argument and the limit."""


def block_of_chunk(chunk: int, n_blocks: int, n_chunks: int) -> int:
    """The block chunk ``chunk`` belongs to under the uniform rule ``chunk * B // K``
    (:meth:`ChunkLayout.uniform`; a non-uniform layout answers with ``blocks_of_chunk``)."""
    return chunk * n_blocks // n_chunks


def chunks_of_block(block: int, n_blocks: int, n_chunks: int) -> range:
    """The contiguous range of chunks that make up ``block`` under the uniform rule (see
    :meth:`ChunkLayout.chunks_of_block` for any layout)."""
    # smallest c with c*B//K >= b is ceil(b*K/B)
    start = -(-block * n_chunks // n_blocks)
    end = -(-(block + 1) * n_chunks // n_blocks)
    return range(start, end)


@dataclass(frozen=True)
class MulticastPlan:
    """A complete multicast schedule plus derived views (arrival ticks, block ticks).

    ``rounds[t-1]`` holds the sends of round ``t``. ``sources`` and ``receiver_nodes`` are node
    ids; ``receivers`` are endpoint ids (GPUs, see the module doc) that must end with every chunk.
    """

    algo: Algo
    n_nodes: int
    gpus_per_node: int
    sources: tuple[int, ...]
    n_blocks: int
    n_chunks: int
    rounds: tuple[tuple[Send, ...], ...]
    receiver_nodes: tuple[int, ...]
    #: Per source node actually used, the chunk order it emits (block reordering); informative.
    source_orders: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    #: NICs per node; NIC j sits on GPU j (1 <= nics_per_node <= gpus_per_node)
    nics_per_node: int = 1
    #: which chunks overlap which block; None means ``ChunkLayout.uniform(n_blocks, n_chunks)``
    layout: ChunkLayout | None = None

    @cached_property
    def chunk_layout(self) -> ChunkLayout:
        """The layout block views use (the uniform rule when none was given)."""
        return resolve_layout(self.layout, self.n_blocks, self.n_chunks)

    # ---- identities -------------------------------------------------------------------------

    def endpoints_of(self, node: int) -> range:
        """Endpoint ids (GPUs) of ``node``."""
        g = self.gpus_per_node
        return range(node * g, node * g + g)

    def node_of(self, endpoint: int) -> int:
        """Node that owns endpoint ``endpoint``."""
        return endpoint // self.gpus_per_node

    @cached_property
    def receivers(self) -> tuple[int, ...]:
        """Receiver endpoints (every GPU of every non-source node)."""
        return tuple(e for n in self.receiver_nodes for e in self.endpoints_of(n))

    @property
    def completion_round(self) -> int:
        """Tick at which every receiver holds every chunk (number of rounds)."""
        return len(self.rounds)

    # ---- arrivals ---------------------------------------------------------------------------

    @cached_property
    def _arrivals(self) -> dict[int, list[int]]:
        """endpoint -> tick at which each chunk arrived (-1: never); sources' endpoints: all 0."""
        k = self.n_chunks
        arr: dict[int, list[int]] = {}
        for s in self.sources:
            for e in self.endpoints_of(s):
                arr[e] = [0] * k
        for e in self.receivers:
            arr[e] = [-1] * k
        for t, rnd in enumerate(self.rounds, start=1):
            for snd in rnd:
                row = arr.get(snd.dst)
                if row is not None and row[snd.chunk] < 0:
                    row[snd.chunk] = t
        return arr

    def _row(self, endpoint: int) -> list[int]:
        row = self._arrivals.get(endpoint)
        if row is None:
            raise PlanError(f"endpoint {endpoint} is neither a source nor a receiver of this plan")
        return row

    def arrival_round(self, endpoint: int, chunk: int) -> int | None:
        """Tick at which ``endpoint`` first holds ``chunk`` (0 for sources, None if never)."""
        row = self._row(endpoint)
        if not 0 <= chunk < self.n_chunks:
            raise PlanError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        t = row[chunk]
        return None if t < 0 else t

    def arrival_order(self, endpoint: int) -> tuple[int, ...]:
        """Chunks in the order ``endpoint`` receives them (ties by chunk id)."""
        row = self._row(endpoint)
        return tuple(sorted((c for c in range(self.n_chunks) if row[c] > 0), key=lambda c: (row[c], c)))

    @cached_property
    def node_block_ticks(self) -> dict[int, list[int]]:
        """receiver node -> tick at which all its GPUs hold each block (a node holds a block when
        every one of its GPUs holds every chunk overlapping it, see :attr:`chunk_layout`)."""
        out: dict[int, list[int]] = {}
        lay = self.chunk_layout
        for n in self.receiver_nodes:
            ticks = [0] * self.n_blocks
            for e in self.endpoints_of(n):
                row = self._arrivals[e]
                for b in range(self.n_blocks):
                    for c in lay.chunks_of_block(b):
                        t = row[c] if row[c] >= 0 else math.inf
                        if t > ticks[b]:
                            ticks[b] = t  # type: ignore[assignment]
            out[n] = ticks
        return out

    def node_full_round(self, node: int) -> int:
        """Tick at which receiver ``node`` (all its GPUs) holds the whole model."""
        return max(self.node_block_ticks[node])

    @cached_property
    def all_blocks_round(self) -> int:
        """Tick at which every block first exists whole on some receiver node (0 if no receivers)."""
        if not self.receiver_nodes:
            return 0
        ticks = self.node_block_ticks
        return max(min(ticks[n][b] for n in self.receiver_nodes) for b in range(self.n_blocks))

    def holdings_at(self, tick: int) -> dict[int, set[int]]:
        """receiver node -> blocks it holds at ``tick``."""
        return {n: {b for b, t in enumerate(bt) if t <= tick} for n, bt in self.node_block_ticks.items()}

    def block_events(self) -> list[tuple[int, int, int]]:
        """(tick, node, block) for every block completion on a receiver node, in time order."""
        ev = [(t, n, b) for n, bt in self.node_block_ticks.items() for b, t in enumerate(bt)]
        ev.sort()
        return ev


# ---- input checks -----------------------------------------------------------------------------

MAX_NODES = 1 << 16
MAX_CHUNKS = 1 << 16


def _check_inputs(
    n_nodes: int, sources: Sequence[int] | int, n_blocks: int, n_chunks: int, gpus_per_node: int
) -> tuple[int, ...]:
    if not 1 <= n_nodes <= MAX_NODES:
        raise PlanError(f"n_nodes must be in [1, {MAX_NODES}], got {n_nodes}")
    if n_blocks < 1:
        raise PlanError(f"n_blocks must be >= 1, got {n_blocks}")
    if not n_blocks <= n_chunks <= MAX_CHUNKS:
        raise PlanError(f"n_chunks must be in [n_blocks={n_blocks}, {MAX_CHUNKS}], got {n_chunks}")
    if gpus_per_node < 1:
        raise PlanError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    if isinstance(sources, int):
        if not 1 <= sources <= n_nodes:
            raise PlanError(f"sources must be in [1, n_nodes={n_nodes}], got {sources}")
        src = tuple(range(sources))
    else:
        src = tuple(sorted(set(int(s) for s in sources)))
        if not src:
            raise PlanError("sources must name at least one node")
        bad = [s for s in src if not 0 <= s < n_nodes]
        if bad:
            raise PlanError(f"source node ids {bad} are outside 0..{n_nodes - 1}")
    return src


def _split_groups(receivers: Sequence[int], n_groups: int) -> list[list[int]]:
    """Contiguous split, sizes differing by at most one, larger groups first."""
    base, extra = divmod(len(receivers), n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        out.append(list(receivers[start:start + size]))
        start += size
    return out


def deal_blocks(n_groups: int, n_blocks: int, n_chunks: int, layout: ChunkLayout | None = None) -> list[list[int]]:
    """Deal blocks into ``n_groups`` sets, largest first: each block (by decreasing extent in the
    layout, lower index first on ties) goes to the set with the least weight so far (lowest index
    on ties); a block weighs its extent (chunks under the uniform layout, bytes under a
    checkpoint's). Each set lists its blocks in ascending order. With equally sized blocks this
    is the round-robin deal of the reference (set g = blocks b with b % n_groups == g); with
    uneven blocks (an embedding or LM head block several times the others) it keeps the sets'
    transfer times balanced, so receivers of different groups together hold every block, and
    can form a pipeline, as early as the split allows. (Dealing in block order instead put both
    large blocks' partners in one set: 450 MB against 810 MB for qwen2-0.5b's 8 blocks, first
    pipeline at 12 of 16 chunk-times instead of 8.)"""
    lay = resolve_layout(layout, n_blocks, n_chunks)
    if not lay.is_uniform() and n_groups <= n_blocks:
        return _contiguous_sets(n_groups, lay)
    sets: list[list[int]] = [[] for _ in range(n_groups)]
    weight = [0] * n_groups

    def extent(b: int) -> int:
        s, e = lay.block_range(b)
        return e - s

    for b in sorted(range(n_blocks), key=lambda b: (-extent(b), b)):
        g = min(range(n_groups), key=lambda i: (weight[i], i))
        sets[g].append(b)
        weight[g] += extent(b)
    return [sorted(x) for x in sets]


def _contiguous_sets(n_groups: int, lay: ChunkLayout) -> list[list[int]]:
    """Blocks split into ``n_groups`` contiguous ranges minimising the most chunks any range needs.

    When chunks do not align with blocks, a chunk across a boundary between two sets is needed by
    both; contiguous ranges have the fewest such boundaries (``n_groups - 1``), and a pipeline
    across groups then needs one stage per group. Exact dynamic programme, O(groups x blocks^2).
    """
    B = lay.n_blocks
    first = [lay.chunks_of_block(b).start for b in range(B)]
    last = [lay.chunks_of_block(b).stop for b in range(B)]

    def need(i: int, j: int) -> int:  # chunks blocks [i, j) overlap
        return last[j - 1] - first[i]

    inf = float("inf")
    # best[g][j]: the smallest max-need splitting blocks [0, j) into g non-empty ranges
    best = [[inf] * (B + 1) for _ in range(n_groups + 1)]
    cut = [[0] * (B + 1) for _ in range(n_groups + 1)]
    best[0][0] = 0
    for g in range(1, n_groups + 1):
        for j in range(g, B + 1):
            for i in range(g - 1, j):
                v = max(best[g - 1][i], need(i, j))
                if v < best[g][j]:
                    best[g][j], cut[g][j] = v, i
    sets: list[list[int]] = []
    j = B
    for g in range(n_groups, 0, -1):
        i = cut[g][j]
        sets.append(list(range(i, j)))
        j = i
    return sets[::-1]


def source_order(group: int, n_groups: int, n_blocks: int, n_chunks: int, layout: ChunkLayout | None = None) -> list[int]:
    """Chunk order of source ``group`` with block reordering.

    Blocks are dealt into ``n_groups`` sets (:func:`deal_blocks`); source g sends set g first,
    then sets g+1, g+2, ... (mod n_groups); chunks of a block ascend. A chunk overlapping two
    blocks is sent with the first of them in this order (each chunk appears once).
    """
    lay = resolve_layout(layout, n_blocks, n_chunks)
    sets = deal_blocks(n_groups, n_blocks, n_chunks, lay)
    order: list[int] = []
    seen: set[int] = set()
    for j in range(n_groups):
        for b in sets[(group + j) % n_groups]:
            for c in lay.chunks_of_block(b):
                if c not in seen:
                    seen.add(c)
                    order.append(c)
    return order


# ---- per-group schedules (local indices: 0 = source, positions = index into the order) ---------

_Local = list[list[tuple[int, int, int]]]  # rounds of (src_local, dst_local, position)


def _binomial_group(n: int, k: int) -> _Local:
    """Binomial pipeline over local nodes 0..n-1 (0 = source) for chunk positions 0..k-1."""
    rounds: _Local = []
    if n <= 1:
        return rounds
    l = n.bit_length() - 1  # floor(log2 n) >= 1
    H = 1 << l
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    # team partner of hypercube node x (x >= 1) for the extras H..n-1
    mate = [-1] * H
    for j, e in enumerate(range(H, n)):
        mate[j + 1] = e

    def team_union(x: int) -> int:
        e = mate[x]
        return holds[x] | (holds[e] if e >= 0 else 0)

    done_needed = n - 1
    t = 0
    limit = 4 * (k + n) + 16
    while True:
        if sum(1 for i in range(1, n) if holds[i] == full) == done_needed:
            break
        if t > limit:  # pragma: no cover - would be a planner bug
            raise RuntimeError(f"binomial schedule did not converge (n={n}, k={k})")
        d = 1 << (t % l)
        # Choose each team's external sender: the member holding the highest chunk the peer team
        # lacks (ties: alternate by round parity). The other member receives from outside and
        # forwards inside to the sender, so each member sends once and receives once.
        sender = list(range(H))
        for x in range(1, H):
            e = mate[x]
            if e < 0:
                continue
            peer_has = team_union(x ^ d)
            bx = (holds[x] & ~peer_has).bit_length()
            be = (holds[e] & ~peer_has).bit_length()
            # When the peer needs nothing from the team, the hypercube member keeps receiving from
            # outside (the mate mirrors it), which gets whole blocks onto one node sooner.
            if be > bx or (be == bx and (be == 0 or t % 2 == 1)):
                sender[x] = e
        sends: list[tuple[int, int, int]] = []
        for x in range(H):
            y = x ^ d
            snd = sender[x]
            recv = y if mate[y] < 0 else (mate[y] if sender[y] == y else y)
            if snd == 0:
                if t < k:
                    pos = t
                else:
                    pos = (full & ~team_union(y)).bit_length() - 1
                    if pos < 0:
                        pos = (full & ~holds[recv]).bit_length() - 1
            else:
                h = holds[snd]
                lack = h & ~team_union(y)
                if not lack:
                    lack = h & ~holds[recv]
                pos = lack.bit_length() - 1
            if pos >= 0 and not (holds[recv] >> pos) & 1:
                sends.append((snd, recv, pos))
        for x in range(1, H):
            e = mate[x]
            if e >= 0:
                a = e if sender[x] == x else x
                b = sender[x]
                lack = holds[a] & ~holds[b]
                if lack:
                    sends.append((a, b, lack.bit_length() - 1))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
        t += 1
    return rounds


def _faasnet_group(n: int, k: int) -> _Local:
    """Binary tree (heap indices, 0 = source), lowest missing chunk first, one send per round."""
    rounds: _Local = []
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    turn = [0] * n
    while any(h != full for h in holds):
        sends = []
        for i in range(n):
            kids = [c for c in (2 * i + 1, 2 * i + 2) if c < n]
            cands = [(c, holds[i] & ~holds[c]) for c in kids]
            cands = [(c, m) for c, m in cands if m]
            if not cands:
                continue
            if len(cands) == 2:
                c, m = cands[turn[i] % 2]
                turn[i] += 1
            else:
                c, m = cands[0]
            pos = (m & -m).bit_length() - 1
            sends.append((i, c, pos))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
    return rounds


def _ring_group(n: int, k: int) -> _Local:
    """Chain 0 -> 1 -> ... -> n-1; each node forwards its lowest missing-at-next chunk."""
    rounds: _Local = []
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    while any(h != full for h in holds):
        sends = []
        for i in range(n - 1):
            m = holds[i] & ~holds[i + 1]
            if m:
                sends.append((i, i + 1, (m & -m).bit_length() - 1))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
    return rounds


def _direct_group(n: int, k: int) -> _Local:
    """The source sends chunk-major: position 0 to every receiver, then position 1, ..."""
    return [[(0, 1 + (t % (n - 1)), t // (n - 1))] for t in range(k * (n - 1))] if n > 1 else []


_GROUP_SCHEDULERS = {
    Algo.BINOMIAL: _binomial_group,
    Algo.FAASNET: _faasnet_group,
    Algo.RING: _ring_group,
    Algo.DIRECT: _direct_group,
}


def plan_multicast(
    algo: Algo | str,
    n_nodes: int,
    sources: Sequence[int] | int,
    n_blocks: int,
    n_chunks: int,
    gpus_per_node: int = 1,
    nics_per_node: int = 1,
    layout: ChunkLayout | None = None,
) -> MulticastPlan:
    """Plan a multicast of ``n_chunks`` chunks (``n_blocks`` blocks) from ``sources`` to every other
    node of ``0..n_nodes-1``.

    ``sources`` is a sequence of node ids or an int S meaning nodes ``0..S-1``. Only
    ``min(len(sources), receivers)`` sources send (lowest ids first); receivers are split into one
    contiguous group per sending source. With ``nics_per_node = L > 1`` (NIC j on GPU j) the
    source order is striped over L lanes, each an independent schedule over NIC j of every node.
    ``layout`` (default: the uniform ``c * B // K`` rule) says which chunks overlap which block;
    it shapes multi-source block reordering and the plan's block views. Pure and deterministic.
    """
    try:
        algo = Algo(algo)
    except ValueError:
        raise PlanError(f"unknown algo {algo!r}; choose one of {[a.value for a in Algo]}") from None
    src = _check_inputs(n_nodes, sources, n_blocks, n_chunks, gpus_per_node)
    try:
        lay = resolve_layout(layout, n_blocks, n_chunks)
    except ValueError as e:
        raise PlanError(f"layout: {e}") from None
    if not 1 <= nics_per_node <= gpus_per_node:
        raise PlanError(f"nics_per_node must be in [1, gpus_per_node={gpus_per_node}], got {nics_per_node}")
    src_set = set(src)
    receivers = [v for v in range(n_nodes) if v not in src_set]
    n_groups = min(len(src), len(receivers))
    groups = _split_groups(receivers, n_groups) if n_groups else []
    sched = _GROUP_SCHEDULERS[algo]
    L = nics_per_node
    # (src node, dst node, chunk, lane); lane j runs over NIC j of every node
    node_rounds: list[list[tuple[int, int, int, int]]] = []
    orders: dict[int, tuple[int, ...]] = {}
    for g, members in enumerate(groups):
        nodes = [src[g], *members]
        if algo is Algo.BINOMIAL:
            order = source_order(g, n_groups, n_blocks, n_chunks, lay)
        else:
            order = list(range(n_chunks))
        orders[src[g]] = tuple(order)
        for lane in range(L):
            sub = order[lane::L]  # lanes stripe the order, so every lane walks the blocks alike
            if not sub:
                continue
            for t, rnd in enumerate(sched(len(nodes), len(sub))):
                while len(node_rounds) <= t:
                    node_rounds.append([])
                node_rounds[t].extend((nodes[a], nodes[b], sub[p], lane) for a, b, p in rnd)
    G = gpus_per_node
    if G == 1:
        rounds = tuple(tuple(Send(a, b, c) for a, b, c, _ in rnd) for rnd in node_rounds)
    else:
        rounds = _expand_topology(node_rounds, G)
    return MulticastPlan(
        algo=algo, n_nodes=n_nodes, gpus_per_node=G, sources=src, n_blocks=n_blocks,
        n_chunks=n_chunks, rounds=rounds, receiver_nodes=tuple(receivers), source_orders=orders,
        nics_per_node=L, layout=layout,
    )


def _expand_topology(node_rounds: list[list[tuple[int, int, int, int]]], G: int) -> tuple[tuple[Send, ...], ...]:
    """Network sends between the lane's NIC GPUs, then fan-out from the receiving GPU to the
    node's other GPUs the round after (one chunk per lane per round, so each intra link carries
    at most one chunk per round)."""
    out: list[list[Send]] = [[] for _ in range(len(node_rounds) + 1)]
    for t, rnd in enumerate(node_rounds):
        for a, b, c, lane in rnd:
            dst = b * G + lane
            out[t].append(Send(a * G + lane, dst, c, SendKind.NETWORK))
            for h in range(G):
                if h != lane:
                    out[t + 1].append(Send(dst, b * G + h, c, SendKind.INTRA))
    while out and not out[-1]:
        out.pop()
    return tuple(tuple(r) for r in out)


def lower_bound_rounds(n: int, k: int) -> int:
    """``k - 1 + ceil(log2 n)`` for one source and ``n`` nodes counting it (0 for n == 1)."""
    if n <= 1:
        return 0
    return k - 1 + (n - 1).bit_length()


class PlanViolation(AssertionError):
    """A plan breaks one of the multicast rules (message says which round, endpoint, chunk)."""


def validate_plan(plan: MulticastPlan) -> None:
    """Check the rules in the module doc; raise :class:`PlanViolation` naming the first breach."""
    K = plan.n_chunks
    full = (1 << K) - 1
    holds: dict[int, int] = {}
    for s in plan.sources:
        for e in plan.endpoints_of(s):
            holds[e] = full
    for e in plan.receivers:
        holds[e] = 0
    node_of = plan.node_of
    G = plan.gpus_per_node
    for t, rnd in enumerate(plan.rounds, start=1):
        nic_out: set[int] = set()
        nic_in: set[int] = set()
        links: set[tuple[int, int]] = set()
        new: list[tuple[int, int]] = []
        for snd in rnd:
            if not 0 <= snd.chunk < K:
                raise PlanViolation(f"round {t}: chunk {snd.chunk} out of range")
            if snd.src not in holds or snd.dst not in holds:
                raise PlanViolation(f"round {t}: unknown endpoint in {snd}")
            if not (holds[snd.src] >> snd.chunk) & 1:
                raise PlanViolation(f"round {t}: endpoint {snd.src} sends chunk {snd.chunk} it does not hold")
            if snd.kind is SendKind.NETWORK:
                a, b = node_of(snd.src), node_of(snd.dst)
                if a == b:
                    raise PlanViolation(f"round {t}: network send inside node {a}")
                for e in (snd.src, snd.dst):
                    if e % G >= plan.nics_per_node:
                        raise PlanViolation(f"round {t}: endpoint {e} has no NIC")
                # each NIC sits on one GPU, so the NIC is named by its endpoint
                if snd.src in nic_out:
                    raise PlanViolation(f"round {t}: NIC of node {a} (endpoint {snd.src}) sends twice")
                if snd.dst in nic_in:
                    raise PlanViolation(f"round {t}: NIC of node {b} (endpoint {snd.dst}) receives twice")
                nic_out.add(snd.src)
                nic_in.add(snd.dst)
            else:
                if node_of(snd.src) != node_of(snd.dst) or snd.src == snd.dst:
                    raise PlanViolation(f"round {t}: intra send {snd} crosses nodes")
                key = (snd.src, snd.dst)
                if key in links:
                    raise PlanViolation(f"round {t}: intra link {key} carries two chunks")
                links.add(key)
            new.append((snd.dst, snd.chunk))
        for e, c in new:
            holds[e] |= 1 << c
    for e in plan.receivers:
        if holds[e] != full:
            missing = [c for c in range(K) if not (holds[e] >> c) & 1]
            raise PlanViolation(f"receiver endpoint {e} ends without chunks {missing[:8]}")
