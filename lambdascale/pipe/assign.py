"""Building one execution pipeline of a given size from the blocks nodes hold: the matching
behind :mod:`lambdascale.pipe.pipelines` (its module doc states the policy).

:func:`build` makes a pipeline from receivers alone: contiguous stages (size - 1 hops) when they
exist, else blocks assigned freely (bipartite matching with loads differing by at most one, then
fewer hops). :func:`build_assisted` makes one whose missing blocks run on helpers. Holdings are
bit masks (``masks[node]``: bit ``b`` set when the node holds block ``b``); ``cap[node]`` is its
capacity in blocks. Both return None when no such pipeline exists.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

from lambdascale.pipe.pipeline_types import Pipeline


def _assign(n_blocks: int, nodes: Sequence[int], masks: Mapping[int, int], size: int) -> tuple[int, ...] | None:
    """Assign every block to one of ``nodes`` (holding it), loads in {floor, ceil} of B/size.

    Phase 1 gives each node ``floor`` slots and matches slots to blocks (Kuhn's augmenting
    paths); it must fill every slot. Phase 2 places the remaining blocks along augmenting paths
    that end at a node below ``ceil``; such a path never lowers a node's load, so every node ends
    with floor or ceil blocks. Returns None when this node set cannot carry the pipeline.
    """
    lo, extra = divmod(n_blocks, size)
    hi = lo + (1 if extra else 0)
    owner = [-1] * n_blocks  # block -> node
    slot_of_block = [-1] * n_blocks  # phase-1 slot holding the block
    slots = [v for v in nodes for _ in range(lo)]
    of_node = {v: [b for b in range(n_blocks) if (masks[v] >> b) & 1] for v in nodes}

    def kuhn(i: int, seen: set[int]) -> bool:
        for b in of_node[slots[i]]:
            if b in seen:
                continue
            seen.add(b)
            j = slot_of_block[b]
            if j == -1 or kuhn(j, seen):
                slot_of_block[b] = i
                return True
        return False

    for i in range(len(slots)):
        if not kuhn(i, set()):
            return None
    load = {v: 0 for v in nodes}
    for b, i in enumerate(slot_of_block):
        if i != -1:
            owner[b] = slots[i]
            load[slots[i]] += 1
    holders = [[v for v in nodes if (masks[v] >> b) & 1] for b in range(n_blocks)]
    for b in range(n_blocks):
        if owner[b] == -1 and not _place_block(b, owner, load, holders, of_node, hi):
            return None
    _fewer_hops(owner, masks)
    return tuple(owner)


def _hops(owner: Sequence[int]) -> int:
    return sum(1 for b in range(1, len(owner)) if owner[b] != owner[b - 1])


def _fewer_hops(owner: list[int], masks: Mapping[int, int]) -> None:
    """Swap pairs of blocks between nodes (both holding both, so loads stay) while that cuts the
    number of network hops: a request crosses one link per stage boundary."""
    B = len(owner)
    improved = True
    while improved:
        improved = False
        for i in range(B):
            for j in range(i + 1, B):
                u, v = owner[i], owner[j]
                if u == v or not (masks[u] >> j) & 1 or not (masks[v] >> i) & 1:
                    continue
                before = _hops(owner)
                owner[i], owner[j] = v, u
                if _hops(owner) < before:
                    improved = True
                else:
                    owner[i], owner[j] = u, v


def _place_block(b: int, owner: list[int], load: dict[int, int], holders, of_node, hi: int) -> bool:
    """Augmenting path from an unplaced block to a node with load < hi (loads never drop)."""
    prev: dict[int, tuple[int, int]] = {}  # node -> (block that reaches it, previous node or -1)
    frontier = [(b, -1)]
    seen_nodes: set[int] = set()
    while frontier:
        nxt = []
        for blk, frm in frontier:
            for v in holders[blk]:
                if v in seen_nodes:
                    continue
                seen_nodes.add(v)
                prev[v] = (blk, frm)
                if load[v] < hi:
                    # walk back: v takes blk, its previous owner takes the block before, ...
                    load[v] += 1
                    cur = v
                    while True:
                        blk_c, frm_c = prev[cur]
                        owner[blk_c] = cur
                        if frm_c == -1:
                            break
                        cur = frm_c
                    return True
                for ob in of_node[v]:
                    if owner[ob] == v:
                        nxt.append((ob, v))
        frontier = nxt
    return False


def _greedy_cover(size: int, n_blocks: int, pool: Sequence[int], masks: Mapping[int, int]) -> tuple[list[int], int]:
    """Up to ``size`` nodes, each time the one adding the most uncovered blocks (counting at most
    ``ceil(B/size)`` per node: what it can carry), poorer nodes first on ties, until none adds
    any; returns them and the blocks they cover (a bit mask)."""
    hi = -(-n_blocks // size)
    covered = 0
    chosen: list[int] = []
    while len(chosen) < size:
        best, gain = -1, 0
        for v in pool:  # pool is poorest-first, so strict '>' keeps the poorer node on ties
            if v in chosen:
                continue
            g = min(hi, (masks[v] & ~covered).bit_count())
            if g > gain:
                best, gain = v, g
        if best < 0:
            break
        chosen.append(best)
        covered |= masks[best]
    return chosen, covered


def _choose_nodes(size: int, n_blocks: int, pool: Sequence[int], masks: Mapping[int, int]) -> list[int] | None:
    """Greedy cover of every block (:func:`_greedy_cover`), then fill up to ``size`` from ``pool``
    in order; None when ``size`` nodes cannot cover every block."""
    chosen, covered = _greedy_cover(size, n_blocks, pool, masks)
    if covered != (1 << n_blocks) - 1:
        return None
    chosen += [v for v in pool if v not in chosen][: size - len(chosen)]
    return chosen if len(chosen) == size else None


def _contiguous(size: int, n_blocks: int, pool: Sequence[int], masks: Mapping[int, int]) -> Pipeline | None:
    """A pipeline of ``size`` contiguous balanced stages (fewest hops: size - 1), if one exists.

    Tries every balanced split (which stages get the extra block) and matches stages to distinct
    nodes holding their ranges (Kuhn's augmenting paths, candidates in ``pool`` order)."""
    lo, extra = divmod(n_blocks, size)
    for big in itertools.combinations(range(size), extra):
        bigs = set(big)
        ranges: list[tuple[int, int]] = []
        start = 0
        for i in range(size):
            n = lo + (1 if i in bigs else 0)
            ranges.append((start, start + n))
            start += n
        cands: list[list[int]] = []
        for a, b in ranges:
            m = ((1 << (b - a)) - 1) << a
            c = [v for v in pool if masks[v] & m == m]
            if not c:
                break
            cands.append(c)
        else:
            nodes = _match_stages(cands)
            if nodes is not None:
                return Pipeline(tuple(v for (a, b), v in zip(ranges, nodes) for _ in range(a, b)))
    return None


def _match_stages(cands: Sequence[Sequence[int]]) -> list[int] | None:
    """A distinct node per stage, ``cands[i]`` in preference order (Kuhn), or None."""
    owner: dict[int, int] = {}
    assign = [-1] * len(cands)

    def augment(i: int, seen: set[int]) -> bool:
        for v in cands[i]:
            if v in seen:
                continue
            seen.add(v)
            j = owner.get(v)
            if j is None or augment(j, seen):
                owner[v] = i
                assign[i] = v
                return True
        return False

    for i in range(len(cands)):
        if not augment(i, set()):
            return None
    return assign


def build(size: int, n_blocks: int, free: Sequence[int], masks: Mapping[int, int], cap: Mapping[int, int]) -> Pipeline | None:
    """One pipeline of ``size`` distinct nodes from ``free`` (poorest first), or None.

    Contiguous balanced stages are tried first (fewest hops). Otherwise blocks are assigned
    freely: node choice is a heuristic (greedy cover, then the same from the richest nodes); the
    assignment on a chosen node set is exact, then block swaps cut hops.
    """
    lo, hi = n_blocks // size, -(-n_blocks // size)
    pool = [v for v in free if cap.get(v, n_blocks) >= hi and masks[v].bit_count() >= max(lo, 1)]
    if len(pool) < size:
        return None
    contiguous = _contiguous(size, n_blocks, pool, masks)
    if contiguous is not None:
        return contiguous
    for order in (pool, sorted(pool, key=lambda v: (-masks[v].bit_count(), v))):
        nodes = _choose_nodes(size, n_blocks, order, masks)
        if nodes is None:
            continue
        a = _assign(n_blocks, nodes, masks, size)
        if a is not None:
            return Pipeline(a)
    return None


def _match_capped(n_blocks: int, nodes: Sequence[int], masks: Mapping[int, int], hi: int) -> list[int]:
    """Blocks on ``nodes`` (each holding what it gets), at most ``hi`` per node: first one
    distinct block for as many nodes as possible (Kuhn), then as many more blocks as augmenting
    paths place. Unplaced blocks are -1; a node that got no block is not in the answer."""
    owner = [-1] * n_blocks
    of_node = {v: [b for b in range(n_blocks) if (masks[v] >> b) & 1] for v in nodes}

    def first(v: int, seen: set[int]) -> bool:
        for b in of_node[v]:
            if b in seen:
                continue
            seen.add(b)
            if owner[b] == -1 or first(owner[b], seen):
                owner[b] = v
                return True
        return False

    if hi < 1:
        return owner
    placed = [v for v in nodes if first(v, set())]
    load = {v: 1 for v in placed}
    holders = [[v for v in placed if (masks[v] >> b) & 1] for b in range(n_blocks)]
    for b in range(n_blocks):
        if owner[b] == -1:
            _place_block(b, owner, load, holders, of_node, hi)  # loads never drop; may fail
    return owner


def build_assisted(size: int, n_blocks: int, free: Sequence[int], masks: Mapping[int, int],
                    cap: Mapping[int, int], room: Mapping[int, int]) -> Pipeline | None:
    """A pipeline on up to ``size`` free receivers (at least one, each carrying one block or more
    and at most ``ceil(B/size)``, or the smallest capacity among them) plus helpers (``room``:
    helper -> blocks it may still run) for the blocks the receivers cannot take, or None when the
    helpers lack the room. Each run of consecutive helper blocks goes to the helper with the most
    room (lowest id on ties), split only when no helper can take all of it.
    """
    hi = -(-n_blocks // size)
    pool = [v for v in free if cap.get(v, n_blocks) >= 1 and masks[v]]
    if not pool or sum(room.values()) == 0:
        return None
    nodes = pool if len(pool) <= size else _greedy_cover(size, n_blocks, pool, masks)[0]
    owner = _match_capped(n_blocks, nodes, masks, min([hi] + [cap.get(v, n_blocks) for v in nodes]))
    missing = [b for b in range(n_blocks) if owner[b] == -1]
    if len(missing) == n_blocks or len(missing) > sum(room.values()):
        return None
    left = dict(room)
    runs: list[list[int]] = []
    for b in missing:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    for run in runs:
        while run:
            h = min((v for v in left if left[v] > 0), key=lambda v: (-min(left[v], len(run)), -left[v], v))
            take = min(left[h], len(run))
            for b in run[:take]:
                owner[b] = h
            left[h] -= take
            run = run[take:]
    full = (1 << n_blocks) - 1
    _fewer_hops(owner, {**{h: full for h in room}, **{v: masks[v] for v in nodes}})
    return Pipeline(tuple(owner))


__all__ = ["build", "build_assisted"]
