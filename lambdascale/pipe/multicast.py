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

from typing import Sequence

from lambdascale.pipe.layout import ChunkLayout, resolve_layout
from lambdascale.pipe.multicast_plan import (
    Algo,
    MulticastPlan,
    PlanError,
    PlanViolation,
    Send,
    SendKind,
    block_of_chunk,
    chunks_of_block,
    validate_plan,
)
from lambdascale.pipe.schedules import GROUP_SCHEDULERS

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
    sched = GROUP_SCHEDULERS[algo]
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


__all__ = [
    "MAX_CHUNKS", "MAX_NODES", "deal_blocks", "lower_bound_rounds", "plan_multicast", "source_order",
    # the plan types (multicast_plan.py), re-exported for the runtime's imports
    "Algo", "MulticastPlan", "PlanError", "PlanViolation", "Send", "SendKind", "block_of_chunk", "chunks_of_block",
    "validate_plan",
]
