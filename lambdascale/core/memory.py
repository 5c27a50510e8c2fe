"""What each node holds, and the memory manager's plans applied on the agents.

The agents report their tiers (``HoldingsReport``: gpu = an instance's copy, host, ssd); the core
keeps the last report per node and, between reports, which models it put in a node's buffers
itself (``held``: received by multicast or loaded for an instance). :class:`NodeMemory` turns
both into the control plane's holdings and applies a
:class:`~lambdascale.control.snapshot.MemoryPlan` (evictions first, then copy-backs) in the
background, never blocking the controller's pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from lambdascale.control.snapshot import Holding, MemoryPlan
from lambdascale.control.snapshot import Tier as CTier
from lambdascale.core.state import CoreStats, Deployment
from lambdascale.runtime.cluster import AgentRequestError, Cluster, NodeLostError

log = logging.getLogger("lambdascale.core.memory")

#: (holdings, host total, host free, ssd total, ssd free) of one node
NodeTiers = tuple[tuple[Holding, ...], int, int, int, int]


class NodeMemory:
    """Per-node holdings and the memory actuator; ``deployments`` is the core's live map."""

    def __init__(self, cluster: Cluster, deployments: dict[str, Deployment], stats: CoreStats,
                 spawn: Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]) -> None:
        self.cluster = cluster
        self.deployments = deployments
        self.stats = stats
        self._spawn = spawn
        self.held: dict[int, set[str]] = {}   # node -> models the core put in its buffers
        self.reports: dict[int, Any] = {}     # node -> its agent's last HoldingsReport
        self._apply: asyncio.Task[Any] | None = None
        self._poll: asyncio.Task[Any] | None = None

    def holds(self, node: int, model: str) -> bool:
        return model in self.held.get(node, set())

    def mark_held(self, node: int, model: str) -> None:
        self.held.setdefault(node, set()).add(model)

    def forget(self, node: int, model: str) -> None:
        self.held.get(node, set()).discard(model)

    def drop_node(self, node: int) -> None:
        """The node died: it holds nothing the core may count on (status, metrics, the snapshot)."""
        self.held.pop(node, None)
        self.reports.pop(node, None)

    def adopt_report(self, node: int, report: Any) -> None:
        """A new incarnation registered with this report of what it really holds."""
        self.held.pop(node, None)
        self.reports[node] = report

    # ---- observation -------------------------------------------------------------------------
    def poll(self) -> None:
        """Ask for fresh reports in the background unless a poll is running (the next snapshot uses them)."""
        if self._poll is None or self._poll.done():
            self._poll = self._spawn(self.refresh())

    async def refresh(self) -> None:
        """Ask every live agent for its holdings."""
        nodes = self.cluster.alive()
        incs = {n: self.cluster.incarnation(n) for n in nodes}
        reps = await asyncio.gather(*(self.cluster.holdings(n) for n in nodes), return_exceptions=True)
        for n, rep in zip(nodes, reps):
            if not self.cluster.is_current(n, incs[n]):
                continue  # died (or rejoined) meanwhile: that report is of an incarnation gone
            if isinstance(rep, NodeLostError):
                self.reports.pop(n, None)
            elif not isinstance(rep, BaseException):
                self.reports[n] = rep

    def node_tiers(self, n: int, now: float) -> NodeTiers | None:
        """Node ``n``'s holdings from its agent's last report (None before the first one arrives).

        ``in_use`` becomes ``pinned`` so the policy never asks to evict what the agent would
        refuse. A model the core put in the node's buffers after that report counts as a host
        copy, pinned until the next report says what it is.
        """
        rep = self.reports.get(n)
        if rep is None:
            return None
        out = {(h.model, h.tier): Holding(h.model, CTier(h.tier), h.nbytes, last_used=now - h.idle_s,
                                          blocks=None if h.blocks is None else frozenset(h.blocks), pinned=h.in_use)
               for h in rep.holdings}
        for name in sorted(self.held.get(n, ())):
            d = self.deployments.get(name)
            if d is not None and not any(out.get((name, t)) and out[(name, t)].complete for t in ("gpu", "host")):
                out[(name, "host")] = Holding(name, CTier.HOST, d.manifest.total_bytes, pinned=True)
        return (tuple(out.values()), rep.host_capacity_bytes, rep.host_free_bytes, rep.ssd_capacity_bytes,
                rep.ssd_free_bytes)

    # ---- the memory manager's plans ------------------------------------------------------------
    def apply(self, plan: MemoryPlan) -> None:
        """Apply ``plan`` in the background (evictions first, then copy-backs). While an earlier
        plan is still being applied this one is skipped: the next pass plans again from fresher
        holdings."""
        if plan.is_noop or (self._apply is not None and not self._apply.done()):
            return
        self._apply = self._spawn(self._apply_plan(plan))

    async def _apply_plan(self, plan: MemoryPlan) -> None:
        ops = self.stats.memory_ops
        for e in plan.evictions:
            d = self.deployments.get(e.model)
            if d is not None and any(e.node in u.nodes for u in d.units):
                continue  # a unit started there since the snapshot: its copy is in use now
            held = self.held.get(e.node, set())
            rep = self.reports.get(e.node)
            # evicting this tier frees the node's buffers (no other in-memory tier claims them)
            last = rep is not None and e.model in held and e.model in rep.buffers and \
                set(rep.tiers_of(e.model)) - {"ssd"} == {e.tier.value}
            if last:
                held.discard(e.model)  # no start may count on these buffers from now on
            try:
                evicted, rep = await self.cluster.evict(e.node, e.model, e.tier.value)
            except AgentRequestError as err:  # in use on the agent: nothing was freed
                ops["evict_refused"] += 1
                if last:
                    held.add(e.model)
                log.info("eviction of %s from node %d's %s tier refused: %s", e.model, e.node, e.tier.value, err)
                continue
            except NodeLostError:
                continue
            self.reports[e.node] = rep
            if e.model not in rep.buffers:
                held.discard(e.model)
            ops["evicted"] += int(evicted)
            log.info("evicted %s from node %d's %s tier (%s)", e.model, e.node, e.tier.value, e.reason.value)
        for cb in plan.copy_backs:
            if not self.holds(cb.node, cb.model) and cb.from_tier.value != "ssd":
                continue  # the node no longer holds it in memory
            try:
                started, rep = await self.cluster.copy_back(cb.node, cb.model, cb.to_tier.value)
            except AgentRequestError as err:
                ops["copy_back_refused"] += 1
                log.info("copy-back of %s to node %d's %s tier refused: %s", cb.model, cb.node, cb.to_tier.value, err)
                continue
            except NodeLostError:
                continue
            self.reports[cb.node] = rep
            if started:
                ops["copy_backs"] += 1
                log.info("copy-back of %s on node %d: %s -> %s started", cb.model, cb.node, cb.from_tier.value,
                         cb.to_tier.value)
