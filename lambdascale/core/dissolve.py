"""Dissolving a λPipe pipeline: its requests leave between steps, each with its KV cache when
shipping it to a full instance is estimated cheaper than recomputing it (``runtime.kv_move``),
else with its token state through the head of the queue. Outputs stay exact either way: a
request's continuation is a function of its token state.

The choices are the shared rules of :mod:`lambdascale.pipe.serving` (``choose_kv_move`` through
:class:`~lambdascale.runtime.kvmove.KvMoveChooser`, and ``kv_destination``), the simulator's too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from lambdascale.core.state import Deployment, Unit
from lambdascale.engine.sequence import TokenState
from lambdascale.pipe.serving import KvTarget, kv_destination
from lambdascale.runtime.cluster import AgentRequestError, NodeLostError
from lambdascale.runtime.kvmove import KvMove, KvMoveChooser, KvPolicy, ship_kv

if TYPE_CHECKING:
    from lambdascale.core.core import ServingCore

log = logging.getLogger("lambdascale.core")


async def dissolve(core: "ServingCore", d: Deployment, u: Unit) -> None:
    """End a pipeline between steps. Each request's KV goes to a full instance with a free slot
    when shipping it is estimated cheaper than recomputing (``runtime.kv_move``); the others
    resume from their token state through the head of the queue."""
    if u not in d.units or u.server is None or u.pipe is None:
        return  # lost already: its requests were moved then
    async with u.lock:
        u.alive = False
        await u.server.drain(suppress=True)  # a failed step leaves its requests' state as it was
        progress = u.server.take_progress()
        shipped = await ship_to_full(core, d, u, progress) if progress else set()
    moved = [rid for rid in progress if rid not in shipped]
    core.stats.requests_moved += len(progress)
    core.stats.kv_recomputed += len(moved)
    if u in d.units:
        d.units.remove(u)
    core.requeue(d, moved)
    if u.task is not None:
        u.task.cancel()
        await asyncio.gather(u.task, return_exceptions=True)
    await u.pipe.dissolve()
    core.stats.pipelines_dissolved += 1
    log.info("pipeline %s of %s dissolved; %d request(s) requeued, %d with their KV shipped",
             u.id, d.name, len(moved), len(shipped))


async def ship_to_full(core: "ServingCore", d: Deployment, src: Unit,
                       progress: dict[str, tuple[TokenState, int]]) -> set[str]:
    """Ship the KV of the dissolving ``src``'s requests for which that beats recomputing, to
    full instances with free slots, while ``src``'s stages still hold it. Returns the requests
    placed (each continues with a decode step there); a failure leaves the rest to recompute."""
    s = core.settings
    if s.kv_move is KvPolicy.RECOMPUTE or src.pipe is None:
        return set()
    chooser = KvMoveChooser.build(core.config.runtime, d.manifest.arch, s.dtype, s.link_gbps, s.emulate_device,
                                  s.batch_invariant, s.kv_move)
    fulls = {u.id: u for u in d.serving if u.alive and u.server is not None and not u.pipelined}
    free = {u.id: u.server.pipe.max_seqs - len(u.server.reqs) for u in fulls.values() if u.server is not None}
    outstanding = {u.id: len(u.server.reqs) for u in fulls.values() if u.server is not None}
    receivers = {n for n in src.nodes if n not in src.helpers}  # their full instances kept slots for us
    plan: dict[str, list[str]] = {}
    for rid, (st, computed) in progress.items():
        r = core.requests.get(rid)
        if r is None or r.done:
            continue
        # a full instance's KV memory holds max_seqs sequences of max_len: a free slot is room
        t = kv_destination([KvTarget(i, fulls[i].node, outstanding[i], free[i], 0) for i in free], 0, receivers)
        dest = fulls[t.id] if t is not None else None
        if dest is None or dest.server is None:
            break
        cost = chooser.choose(len(st.prompt_ids), computed, dest.server.prefill_tokens_per_s,
                              dest.server.decode_step_s)
        if cost.choice is KvMove.SHIP:
            plan.setdefault(dest.id, []).append(rid)
            free[dest.id] -= 1
            outstanding[dest.id] += 1
    placed: set[str] = set()
    for dest in (fulls[i] for i in plan):
        rids = plan[dest.id]
        try:
            async with dest.lock:  # between the destination's steps: its KV cache is ours
                if not dest.alive or dest.server is None:
                    continue
                core.stats.kv_bytes_shipped += await ship_kv(core.cluster, src.pipe, dest.server.pipe, rids)
                for rid in rids:
                    st, computed = progress[rid]
                    dest.server.add(rid, st, computed=computed)
                    core.dispatch_log.append((d.name, rid, dest.id))
                placed.update(rids)
        except (NodeLostError, AgentRequestError) as e:  # these requests recompute elsewhere
            log.warning("shipping KV of %d request(s) of %s to %s failed (%s); they recompute", len(rids), d.name,
                        dest.id, e)
    core.stats.kv_shipped += len(placed)
    if placed:
        d.wakeup.set()
    return placed
