"""The serving core's side of membership: what happens when a node dies or comes back.

A dead node holds nothing the core may count on from then on (no holdings in the snapshot, in
``status`` or ``/metrics``; never a multicast source) and its units end: an idle one at once, one
mid-step when its step fails; either way its requests go back to the head of the queue with their
token state. A node that comes back is a new incarnation: its report of what it really holds
(SSD files verified, memory as it stood) is adopted, so locality-aware placement sees a warm
start where it kept a copy; it is warmed (torch imported) and the controller gets a pass.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from lambdascale.errors import LambdaScaleError
from lambdascale.membership import MemberState
from lambdascale.runtime.cluster import MemberEvent
from lambdascale.runtime.messages import Warmup

if TYPE_CHECKING:
    from lambdascale.core.core import ServingCore

log = logging.getLogger("lambdascale.core")


def on_member(core: "ServingCore", ev: MemberEvent) -> None:
    """A node changed state (:meth:`~lambdascale.runtime.cluster.Cluster.watch`); see the module docstring."""
    if ev.state is MemberState.DEAD:
        core.stats.nodes_lost += 1
        core.memory.drop_node(ev.node)
        for d in core.deployments.values():
            if any(ev.node in u.nodes for u in d.units):
                d.wakeup.set()  # its worker sees the member gone and hands its requests back
        asyncio.get_running_loop().call_soon(core.kick)
    elif ev.state is MemberState.ALIVE and ev.reason in ("joined", "rejoined"):
        rep = core.cluster.join_reports.get(ev.node)
        if rep is not None:
            core.memory.adopt_report(ev.node, rep)
        if ev.reason == "rejoined":
            core.stats.nodes_rejoined += 1
        if core._started:
            core.spawn(welcome(core, ev.node, ev.incarnation))


async def welcome(core: "ServingCore", node: int, incarnation: int) -> None:
    """A node that (re)joined after start: import torch there now, then let the controller place."""
    if core.settings.warm_agents:
        try:
            await core.cluster.request(node, Warmup(req=0))
        except LambdaScaleError as e:
            log.info("node %d incarnation %d not warmed: %s", node, incarnation, e)
    core.kick()
    for d in core.deployments.values():
        d.wakeup.set()
