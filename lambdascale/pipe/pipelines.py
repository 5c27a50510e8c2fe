"""Execution-pipeline planner (execute-while-load).

While a multicast runs, receivers together hold every block long before any one of them holds
all. This module decides which cross-node pipelines to run on the blocks already present.

Policy (pure function of holdings, capacity and the pipelines already running):

1. *Planned sizes* halve from the block count and fit the receivers:
   ``planned_sizes(8 blocks, 7 nodes) == (4, 2, 1)``; a size-1 entry stands for nodes serving alone.
2. A node that holds every block (and has capacity for all of them) is *solo-capable*; it never
   joins a pipeline. A running pipeline is *dissolved* when one of its members becomes
   solo-capable (its requests move to full instances with their token state, see DESIGN.md), or
   when a member no longer holds its stage's blocks or lost the capacity for them.
3. For every planned size >= 2 with fewer pipelines running than planned, largest first, build
   pipelines from free nodes
   (not solo-capable, not in a kept pipeline): node loads differ by at most one block, the
   stages cover blocks ``0..B-1`` in order, and each runs on a node holding its blocks. Nodes
   holding fewer blocks are preferred, so richer nodes stay free for smaller pipelines.
   Contiguous stages (size - 1 hops) are preferred; when none exist (several sources deal
   blocks round-robin, so early holdings interleave), blocks are assigned freely and a node may
   run several non-adjacent stages of one pipeline.

4. *Helpers* (optional): nodes that already serve the whole model (the multicast's sources) and
   may lend their device to pipelines, ``helpers[node]`` blocks at most over all pipelines.
   Receivers alone hold every block no sooner than K/S chunk-times after the multicast starts
   (every block must leave one of S sources once); helpers let a pipeline form as soon as the
   receivers hold part of the model. When a planned size cannot be built from receivers alone, an
   *assisted* pipeline is built: up to ``size`` free receivers (fewer when no more hold a block)
   carry one block or more each, at most ``ceil(B/size)``, and helpers run the blocks they lack,
   each run of consecutive blocks on one helper where room allows. It fills the smallest planned
   size that holds its receivers. A planned size of 1 (a receiver that would serve alone: the one
   receiver of a 1 -> 2 scale-out, or the odd one out of 5) takes an assisted pipeline too: that
   receiver runs the blocks it holds and the helpers the rest. No assisted pipeline forms once a
   receiver can serve alone; a formed one is kept, like any pipeline, until a receiver in it can
   serve alone.

``capacity[node]`` is the node's free capacity in blocks: the most blocks it can execute (KV-cache
memory for their layers); 0 takes the node out. Nodes missing from ``capacity`` are unlimited.

:class:`PipelinePlanner` is the incremental form called on every chunk arrival: a block is complete
on a node when every chunk overlapping it (its :class:`~lambdascale.pipe.layout.ChunkLayout`) is
held, so one chunk may complete two blocks; a chunk that completes none costs O(1), and a completed block re-plans only when it can change the
answer (the node became solo-capable, or a planned size is not running). Its decisions equal
:func:`plan_pipelines` fed with the previous answer (a test checks it).

The types (:class:`Stage`, :class:`Pipeline`, :class:`PipelinePlan`) live in
:mod:`lambdascale.pipe.pipeline_types` and are re-exported here; building one pipeline of a given
size from holdings (the matching) is :mod:`lambdascale.pipe.assign`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from lambdascale.pipe.assign import build, build_assisted
from lambdascale.pipe.layout import ChunkLayout, resolve_layout
from lambdascale.pipe.multicast_plan import PlanError
from lambdascale.pipe.pipeline_types import Pipeline, PipelinePlan, Stage


def planned_sizes(n_blocks: int, n_nodes: int) -> tuple[int, ...]:
    """Pipeline sizes by halving from the block count, taken while they fit ``n_nodes`` nodes.

    One pass walks ``B, B//2, B//4, ..., 1`` and takes each size that still fits (8 blocks, 7
    nodes: 4, 2, 1). Passes repeat until every node is planned, so large clusters run several
    pipelines of a size (8 blocks, 20 nodes: 8, 4, 4, 2, 1, 1). Largest first.
    """
    out: list[int] = []
    used = 0
    while used < n_nodes:
        s = n_blocks
        while s >= 1:
            if used + s <= n_nodes:
                out.append(s)
                used += s
            s //= 2
    return tuple(sorted(out, reverse=True))


def _to_masks(holdings: Mapping[int, Iterable[int]], n_blocks: int) -> dict[int, int]:
    masks: dict[int, int] = {}
    for node, blocks in holdings.items():
        m = 0
        for b in blocks:
            if not 0 <= b < n_blocks:
                raise PlanError(f"holdings of node {node}: block {b} outside 0..{n_blocks - 1}")
            m |= 1 << b
        masks[node] = m
    return masks


def _plan_masks(
    masks: Mapping[int, int],
    n_blocks: int,
    cap: Mapping[int, int],
    current: Sequence[Pipeline],
    sizes: Sequence[int],
    helpers: Mapping[int, int] | None = None,
) -> PipelinePlan:
    full_mask = (1 << n_blocks) - 1
    solo = sorted(v for v, m in masks.items() if m == full_mask and cap.get(v, n_blocks) >= n_blocks)
    solo_set = set(solo)
    room = dict(helpers or {})  # helper -> blocks it may still run
    keep: list[Pipeline] = []
    dissolve: list[Pipeline] = []
    used: set[int] = set()
    for p in current:
        if len(p.assignment) != n_blocks:
            raise PlanError(f"current pipeline {p.assignment} does not cover {n_blocks} blocks")
        loads = p.loads()
        ok = all(
            v in room or (v in masks and v not in solo_set and v not in used and (masks[v] >> b) & 1)
            for b, v in enumerate(p.assignment)
        ) and all(
            room[v] >= n if v in room else cap.get(v, n_blocks) >= n for v, n in loads.items()
        )
        if ok:
            keep.append(p)
            used.update(v for v in p.nodes if v not in room)
            for v, n in loads.items():
                if v in room:
                    room[v] -= n
        else:
            dissolve.append(p)
    want = _pipe_counts(sizes, assisted=bool(room))
    have = Counter(_slot(p, room, want) for p in keep)
    free = [v for v in masks if v not in solo_set and v not in used and cap.get(v, n_blocks) >= 1]
    free.sort(key=lambda v: (masks[v].bit_count(), v))
    form: list[Pipeline] = []
    for s in sorted(want, reverse=True):
        while have[s] < want[s]:
            built = build(s, n_blocks, free, masks, cap)
            if built is None and room and not solo:  # helpers bridge the time before any node is full
                built = build_assisted(s, n_blocks, free, masks, cap, room)
                if built is not None:
                    for v, n in built.loads().items():
                        if v in room:
                            room[v] -= n
            if built is None:
                break  # fewer free nodes will not do better for this size
            form.append(built)
            have[s] += 1
            taken = set(built.nodes)
            free = [v for v in free if v not in taken]
    return PipelinePlan(tuple(form), tuple(keep), tuple(dissolve), tuple(solo), tuple(sizes))


def _slot(p: Pipeline, helpers: Mapping[int, int], want: Mapping[int, int]) -> int:
    """The planned size a running pipeline fills: its receivers (nodes that are not helpers), or,
    for an assisted pipeline with fewer, the smallest planned size that holds them."""
    n = sum(1 for v in p.nodes if v not in helpers)
    return min((s for s in want if s >= n), default=n) if n < p.size else n


def _pipe_counts(sizes: Sequence[int], assisted: bool = False) -> Counter[int]:
    """How many pipelines of each size >= 2 the plan wants (size 1 = solo nodes); with helpers
    (``assisted``) a size-1 slot wants an assisted pipeline until its receiver can serve alone."""
    return Counter(s for s in sizes if s >= 2 or assisted)


def _check_sizes(sizes: Sequence[int], n_blocks: int) -> tuple[int, ...]:
    bad = [s for s in sizes if not 1 <= s <= n_blocks]
    if bad:
        raise PlanError(f"pipeline sizes {bad} outside 1..n_blocks={n_blocks}")
    return tuple(sorted(sizes, reverse=True))


def _check_helpers(helpers: Mapping[int, int] | None, nodes: Iterable[int]) -> dict[int, int]:
    out = dict(helpers or {})
    both = sorted(set(out) & set(nodes))
    if both:
        raise PlanError(f"nodes {both} are both helpers and receivers")
    bad = {v: n for v, n in out.items() if n < 0}
    if bad:
        raise PlanError(f"helper room must be >= 0 blocks, got {bad}")
    return out


def _check_common(n_blocks: int, capacity: Mapping[int, int] | None) -> dict[int, int]:
    if n_blocks < 1:
        raise PlanError(f"n_blocks must be >= 1, got {n_blocks}")
    cap = dict(capacity or {})
    for v, c in cap.items():
        if c < 0:
            raise PlanError(f"capacity of node {v} must be >= 0 blocks, got {c}")
    return cap


def plan_pipelines(
    holdings: Mapping[int, Iterable[int]],
    n_blocks: int,
    capacity: Mapping[int, int] | None = None,
    current: Sequence[Pipeline] = (),
    sizes: Sequence[int] | None = None,
    layout: ChunkLayout | None = None,
    helpers: Mapping[int, int] | None = None,
) -> PipelinePlan:
    """Decide pipelines for nodes ``holdings`` (node -> blocks held). Pure and deterministic.

    ``current`` are the pipelines already running (kept or dissolved by the rules in the module
    doc); ``sizes`` overrides :func:`planned_sizes` over all nodes in ``holdings`` (each in
    ``1..n_blocks``; tried largest first). With ``layout``, ``holdings`` maps each node to the
    *chunks* it holds, and a block counts as held when every chunk overlapping it is
    (:meth:`ChunkLayout.blocks_held`). ``helpers`` (node -> blocks it may run for pipelines) are
    nodes serving the whole model already, not in ``holdings`` (rule 4 of the module doc).
    """
    if layout is not None:
        if layout.n_blocks != n_blocks:
            raise PlanError(f"layout has {layout.n_blocks} blocks, n_blocks is {n_blocks}")
        for node, chunks in holdings.items():
            bad = [c for c in chunks if not 0 <= c < layout.n_chunks]
            if bad:
                raise PlanError(f"holdings of node {node}: chunk {bad[0]} outside 0..{layout.n_chunks - 1}")
        holdings = {node: layout.blocks_held(chunks) for node, chunks in holdings.items()}
    cap = _check_common(n_blocks, capacity)
    masks = _to_masks(holdings, n_blocks)
    sz = _check_sizes(sizes, n_blocks) if sizes is not None else planned_sizes(n_blocks, len(masks))
    return _plan_masks(masks, n_blocks, cap, current, sz, _check_helpers(helpers, masks))


class PipelinePlanner:
    """Incremental planner: feed it chunk (or block) arrivals, read the running pipelines.

    ``on_chunk`` returns the new :class:`PipelinePlan` when something changed, else None.
    """

    def __init__(
        self,
        nodes: Iterable[int],
        n_blocks: int,
        n_chunks: int | None = None,
        capacity: Mapping[int, int] | None = None,
        sizes: Sequence[int] | None = None,
        holdings: Mapping[int, Iterable[int]] | None = None,
        layout: ChunkLayout | None = None,
        helpers: Mapping[int, int] | None = None,
    ) -> None:
        self.n_blocks = n_blocks
        if n_chunks is None:
            n_chunks = layout.n_chunks if layout is not None else n_blocks
        self.n_chunks = n_chunks
        if layout is None and self.n_chunks < n_blocks:
            raise PlanError(f"n_chunks must be >= n_blocks={n_blocks}, got {self.n_chunks}")
        try:
            self.layout = resolve_layout(layout, n_blocks, self.n_chunks)
        except ValueError as e:
            raise PlanError(f"layout: {e}") from None
        self._cap = _check_common(n_blocks, capacity)
        node_list = list(nodes)
        self._masks = _to_masks({v: (holdings or {}).get(v, ()) for v in node_list}, n_blocks)
        self._helpers = _check_helpers(helpers, node_list)
        self._explicit_sizes = sizes is not None
        self.sizes = _check_sizes(sizes, n_blocks) if sizes is not None else planned_sizes(n_blocks, len(node_list))
        # chunks still missing per (node, block): a block completes when its count reaches 0
        B = n_blocks
        self._per_block = self.layout.block_chunk_counts()
        self._missing: dict[tuple[int, int], int] = {}
        self._seen: set[tuple[int, int]] = set()
        self.plan = _plan_masks(self._masks, B, self._cap, (), self.sizes, self._helpers)

    @property
    def active(self) -> tuple[Pipeline, ...]:
        return self.plan.active

    @property
    def solo(self) -> tuple[int, ...]:
        return self.plan.solo

    @property
    def helpers(self) -> dict[int, int]:
        """helper -> blocks it may run for pipelines (rule 4 of the module doc)."""
        return dict(self._helpers)

    def holdings(self) -> dict[int, set[int]]:
        """node -> blocks held, as the planner sees it."""
        return {v: {b for b in range(self.n_blocks) if (m >> b) & 1} for v, m in self._masks.items()}

    def on_chunk(self, node: int, chunk: int) -> PipelinePlan | None:
        """Record that ``node`` holds ``chunk``; re-plan if that completed a block (or two, when the
        chunk spans a block boundary) and it matters. Returns the plan after the last change."""
        if node not in self._masks:
            raise PlanError(f"node {node} is not one of the planner's nodes (or was removed)")
        if not 0 <= chunk < self.n_chunks:
            raise PlanError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        if (node, chunk) in self._seen:
            return None
        self._seen.add((node, chunk))
        out: PipelinePlan | None = None
        for b in self.layout.blocks_of_chunk(chunk):
            key = (node, b)
            left = self._missing.get(key, self._per_block[b]) - 1
            self._missing[key] = left
            if left == 0:
                changed = self.on_block(node, b)
                if changed is not None:
                    out = changed
        return self.plan if out is not None else None

    def on_block(self, node: int, block: int) -> PipelinePlan | None:
        """Record that ``node`` holds all of ``block``; returns the new plan if it changed."""
        if node not in self._masks:
            raise PlanError(f"node {node} is not one of the planner's nodes")
        if not 0 <= block < self.n_blocks:
            raise PlanError(f"block {block} outside 0..{self.n_blocks - 1}")
        m = self._masks[node] | (1 << block)
        if m == self._masks[node]:
            return None
        self._masks[node] = m
        became_full = m == (1 << self.n_blocks) - 1
        want = _pipe_counts(self.sizes, assisted=bool(self._helpers))
        have = Counter(_slot(p, self._helpers, want) for p in self.plan.active)
        if not became_full and all(have[s] >= n for s, n in want.items()):
            return None  # every planned pipeline runs and no member can leave: nothing to do
        new = _plan_masks(self._masks, self.n_blocks, self._cap, self.plan.active, self.sizes, self._helpers)
        old_solo = self.plan.solo
        self.plan = new
        if new.changed or new.solo != old_solo:
            return new
        return None

    def remove_node(self, node: int) -> PipelinePlan | None:
        """Forget ``node`` (it died or left): its holdings no longer count, pipelines through it dissolve.

        Equals :func:`plan_pipelines` on the surviving holdings with ``current`` = the pipelines
        running before the removal, and ``sizes`` = the sizes given at construction or, when none
        were given, ``planned_sizes(n_blocks, survivors)`` (the halving refits the smaller
        cluster). Any planned size left unbuilt by the dissolution is rebuilt from free survivors
        at once, so a replacement pipeline forms without waiting for another arrival. Returns the
        new plan when something changed (always, when a pipeline ran through ``node`` or it was
        solo), else None. Removing an unknown or already removed node raises :class:`PlanError`.
        A helper may be removed too: the pipelines it runs stages of dissolve.
        """
        if node in self._helpers:  # a helper left: pipelines through it dissolve and are re-planned
            del self._helpers[node]
            old = self.plan
            self.plan = _plan_masks(self._masks, self.n_blocks, self._cap, old.active, self.sizes, self._helpers)
            return self.plan if self.plan.changed else None
        if node not in self._masks:
            raise PlanError(f"node {node} is not one of the planner's nodes (or was already removed)")
        del self._masks[node]
        self._seen = {k for k in self._seen if k[0] != node}
        self._missing = {k: v for k, v in self._missing.items() if k[0] != node}
        if not self._explicit_sizes:
            self.sizes = planned_sizes(self.n_blocks, len(self._masks))
        old = self.plan
        new = _plan_masks(self._masks, self.n_blocks, self._cap, old.active, self.sizes, self._helpers)
        self.plan = new
        if new.changed or new.solo != old.solo:
            return new
        return None


__all__ = ["Pipeline", "PipelinePlan", "PipelinePlanner", "Stage", "plan_pipelines", "planned_sizes"]
