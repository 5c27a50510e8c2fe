"""Multicast plan types: a :class:`MulticastPlan` (which endpoint sends which chunk to whom,
round by round), its sends, the chunk/block arithmetic, and :func:`validate_plan`, which checks
the rules every plan obeys (see :mod:`lambdascale.pipe.multicast` for the rules, the endpoint ids
and the algorithms that build plans).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Mapping, NamedTuple

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


__all__ = ["Algo", "MulticastPlan", "PlanError", "PlanViolation", "Send", "SendKind", "block_of_chunk",
           "chunks_of_block", "validate_plan"]
