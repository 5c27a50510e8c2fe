"""Serving a request burst while a model scales out: lambdascale and its baselines on real agents.

Every system starts with full instances on the sources and a burst of requests in one FIFO
queue; what differs is how the other nodes get the model and when they start serving:

* ``lambdascale``: binomial multicast; on every verified chunk the incremental
  :class:`~lambdascale.pipe.pipelines.PipelinePlanner` may form execution pipelines across
  receivers (execute-while-load) or dissolve them when a member holds the whole model; the
  dissolved pipeline's requests move to full instances with their token state: their KV is
  shipped there when that is estimated cheaper (:mod:`lambdascale.runtime.kvmove`), else they go
  back to the head of the queue and resume elsewhere (KV recomputed: one prefill, or in
  batch-invariant mode a step-by-step replay, see :mod:`lambdascale.runtime.pipeline`); outputs
  stay exact. With ``runtime.pipeline_helper_blocks`` the sources are the planner's helpers: they
  run the blocks no receiver holds yet, beside their own full instances, so the first pipeline
  forms before the receivers hold every block between them.
* ``faasnet``: tree multicast, a node serves once it holds the full model.
* ``nccl``: ring broadcast, a node serves once it holds the full model.
* ``local``: every new node loads the model from its own SSD tier (``ssd_gbps`` cap).

Instances (full or pipeline) pull requests from the queue up to their batch and run continuous
batching steps. A full instance takes ``max_seqs``; a pipeline takes what its members' KV memory
holds (``runtime.pipeline_batch``, :func:`~lambdascale.runtime.pipeline.pipeline_batch`: twice
``max_seqs`` for two equal stages) (:class:`~lambdascale.runtime.pipeline.PipelineServer`) and
keeps one micro-batch in flight per stage (``runtime.pipeline_microbatches``). A dissolving
pipeline first finishes the steps in flight, then ships or recomputes each request's KV.

Faults: an instance whose member dies mid-step hands its requests' token states back to the
head of the queue (no token of the failed step was delivered, so nothing is lost or repeated);
the multicast re-plans around the dead node (:mod:`lambdascale.runtime.multicast`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from lambdascale.engine.sequence import TokenState
from lambdascale.model.manifest import Manifest
from lambdascale.pipe.multicast import Algo
from lambdascale.pipe.pipelines import PipelinePlan, PipelinePlanner
from lambdascale.runtime.cluster import AgentRequestError, Cluster, NodeLost, NodeLostError
from lambdascale.runtime.kvmove import KvMove, KvMoveChooser, KvPolicy, ship_kv
from lambdascale.runtime.messages import ChunkHeld, HoldModel, Warmup
from lambdascale.runtime.multicast import MulticastProgress, MulticastResult, prepare_receivers, run_multicast
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StageDtype, StagePlacement, pipeline_batch


class SystemKind(str, Enum):
    LAMBDASCALE = "lambdascale"
    FAASNET = "faasnet"
    NCCL = "nccl"
    LOCAL = "local"


_ALGO = {SystemKind.LAMBDASCALE: Algo.BINOMIAL, SystemKind.FAASNET: Algo.FAASNET, SystemKind.NCCL: Algo.RING}


@dataclass
class ScaleOutReport:
    """What one system did with one burst; times in seconds from the burst."""

    system: SystemKind
    ttft: dict[str, float] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    node_serving_s: dict[int, float] = field(default_factory=dict)  # first time each new node served alone
    all_solo_s: float = 0.0
    pipelines_formed: int = 0
    pipelines_dissolved: int = 0
    requests_moved: int = 0
    instances_failed: int = 0
    bytes_moved: int = 0
    multicast: MulticastResult | None = None
    nodes_lost_s: dict[int, float] = field(default_factory=dict)  # node -> when its loss reached the planner
    instance_started_s: dict[str, float] = field(default_factory=dict)  # instance name -> when it began serving
    instance_forming_s: dict[str, float] = field(default_factory=dict)  # instance name -> seconds its stages took to form
    first_token_by: dict[str, str] = field(default_factory=dict)  # request -> instance that gave its first token
    tokens_by_instance: dict[str, int] = field(default_factory=dict)  # instance name -> tokens it produced
    instance_nodes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # instance name -> its stages' nodes
    kv_shipped: int = 0  # requests whose KV moved to their full instance on dissolution
    kv_recomputed: int = 0  # requests moved with KV to recompute (policy, cost, no free full instance, or a failure)
    kv_bytes_shipped: int = 0
    batch_invariant: bool = False  # the numerics every stage ran with
    replayed_tokens: int = 0  # batch-invariant recompute: outputs re-fed as decode steps
    replay_mismatches: int = 0  # of those, samples that differed from the streamed token (0 when exact)


@dataclass
class _Instance:
    name: str
    server: PipelineServer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    task: asyncio.Task | None = None
    reserved: int = 0  # sequence slots promised to requests whose KV is on its way here

    def free_slots(self) -> int:
        return self.server.pipe.max_seqs - len(self.server.reqs) - self.reserved


async def prepare_sources(cluster: Cluster, nodes: int, sources: list[int], model_dir: Path) -> None:
    """Set-up before :func:`serve_scale_out`: every agent imports its engine (a real node has its
    runtime up before it scales) and the sources hold the model. The sources' read is not paced
    by the SSD cap: it is placement, not part of what a scale-out measures."""
    await asyncio.gather(*(cluster.request(n, Warmup(req=0)) for n in range(nodes)))
    await asyncio.gather(*(cluster.request(s, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False))
                           for s in sources))


async def serve_scale_out(
    cluster: Cluster,
    model_dir: Path,
    manifest: Manifest,
    sources: list[int],
    receivers: list[int],
    requests: dict[str, TokenState],
    system: SystemKind | str,
    eos_token_ids: frozenset[int] = frozenset(),
    max_seqs: int = 8,
    max_len: int = 512,
    max_step_tokens: int = 512,
    on_pipeline_formed: Callable[[str, list[int]], None] | None = None,
    emulate_device: str | None = None,
    device: str = "cpu",
    kv_policy: KvPolicy | str | None = None,
    link_gbps: float | None = None,
    dtype: StageDtype = "float32",
    batch_invariant: bool = False,
) -> ScaleOutReport:
    """Fire ``requests`` at once and scale ``manifest`` from ``sources`` (holding it) to ``receivers``.

    ``kv_policy`` (default ``cluster.settings.kv_move``) decides how a dissolving pipeline's
    requests take their KV along; ``link_gbps`` is the link rate for that estimate (default
    ``cluster.settings.kv_link_gbps``, for uncapped links). ``dtype`` is what every stage computes
    in (the exactness reference must use the same). ``batch_invariant`` turns on the engine's
    batch-invariant numerics on every stage (``engine.batch_invariant``): outputs then equal a
    single-node run with the same mode and chunk rule bitwise, and requests that move without
    their KV (dissolution with recompute, a dead pipeline node) are replayed step by step.
    """
    system = SystemKind(system)
    rs = cluster.settings
    kv_policy = KvPolicy(kv_policy if kv_policy is not None else rs.kv_move)
    kv = KvMoveChooser.build(rs, manifest.arch, dtype, link_gbps, emulate_device, batch_invariant, kv_policy)
    rep = ScaleOutReport(system, batch_invariant=batch_invariant)
    servers: list[PipelineServer] = []  # every instance's server, for the replay counters
    queue: deque[tuple[str, TokenState]] = deque(requests.items())
    wake = asyncio.Event()
    all_done = asyncio.Event()
    t0 = time.monotonic()
    instances: dict[str, _Instance] = {}
    by_assignment: dict[tuple[int, ...], str] = {}
    solo: set[int] = set(sources)
    background: set[asyncio.Task] = set()

    def token_sink(name: str) -> Callable[[str, int], None]:
        def on_token(rid: str, tok: int) -> None:
            if rid not in rep.ttft:
                rep.ttft[rid] = time.monotonic() - t0
                rep.first_token_by[rid] = name
            rep.outputs.setdefault(rid, []).append(tok)
            rep.tokens_by_instance[name] = rep.tokens_by_instance.get(name, 0) + 1
        return on_token

    async def worker(inst: _Instance) -> None:
        srv = inst.server
        while not inst.closed and not all_done.is_set():
            while queue and inst.free_slots() > 0:
                rid, st = queue.popleft()
                srv.add(rid, st)
            if not srv.busy:
                wake.clear()
                await wake.wait()
                continue
            failed = False
            async with inst.lock:
                if inst.closed:
                    break
                before = set(srv.finished)
                try:
                    await srv.step()
                except (NodeLostError, AgentRequestError):
                    # A member died mid-step: no token of this step was delivered, so the token
                    # states are exact; the requests resume on another instance.
                    inst.closed = failed = True
                    moved = srv.take()
                    rep.instances_failed += 1
                    rep.requests_moved += len(moved)
                    queue.extendleft(reversed(list(moved.items())))
                    instances.pop(inst.name, None)
                    for key in [k for k, v in by_assignment.items() if v == inst.name]:
                        del by_assignment[key]
                now = time.monotonic() - t0
                for rid in set(srv.finished) - before:
                    rep.finish[rid] = now
            if failed:
                wake.set()
                await srv.pipe.dissolve()  # best effort on the survivors
                return
            if len(rep.finish) == len(requests):
                all_done.set()
                wake.set()

    async def start_instance(name: str, placements: list[StagePlacement], reserve: int = 0) -> _Instance:
        seqs, step_tokens = pipeline_batch(placements, manifest, max_seqs, max_step_tokens, rs.pipeline_batch)
        pipe = RemotePipeline(cluster, manifest, placements, max_len=max_len, max_seqs=seqs,
                              max_step_tokens=step_tokens, name=name, emulate_device=emulate_device,
                              device=device, dtype=dtype, batch_invariant=batch_invariant,
                              microbatches=rs.pipeline_microbatches)
        forming = time.monotonic()
        await pipe.form()
        rep.instance_forming_s[name] = time.monotonic() - forming
        inst = _Instance(name, PipelineServer(pipe, eos_token_ids, on_token=token_sink(name)), reserved=reserve)
        servers.append(inst.server)
        instances[name] = inst
        rep.instance_started_s[name] = time.monotonic() - t0
        rep.instance_nodes[name] = tuple(p.node for p in placements)
        inst.task = asyncio.get_running_loop().create_task(worker(inst))
        return inst

    async def start_solo(node: int, reserve: int = 0) -> _Instance | None:
        if node in solo and node not in sources:
            return None
        solo.add(node)
        try:
            inst = await start_instance(f"solo{node}", [StagePlacement(node, (0, manifest.n_blocks))], reserve)
        except (NodeLostError, AgentRequestError):
            return None  # died right after it got the model
        rep.node_serving_s.setdefault(node, time.monotonic() - t0)
        return inst

    async def ship_to_full(src: _Instance, moved: dict[str, tuple[TokenState, int]],
                           holds: dict[str, int]) -> set[str]:
        """Ship the KV of the moved requests for which that beats recomputing; returns those placed.

        Destinations are running full instances with free slots, first the slots ``holds``
        (instance -> slots) kept for this dissolution when its solo instances started. Slots stay
        reserved while the KV travels, so the queue cannot take them. A failure falls back to
        recomputing.
        """
        if kv_policy is KvPolicy.RECOMPUTE:
            return set()
        fulls = [i for i in instances.values() if len(i.server.pipe.placements) == 1 and not i.closed]
        fulls.sort(key=lambda i: -holds.get(i.name, 0))  # slots kept for us first
        plan: dict[str, list[str]] = {}
        for rid, (st, computed) in moved.items():
            dest = next((i for i in fulls if holds.get(i.name, 0) > 0 or i.free_slots() > 0), None)
            if dest is None:
                break
            cost = kv.choose(len(st.prompt_ids), computed, dest.server.prefill_tokens_per_s, dest.server.decode_step_s)
            if cost.choice is KvMove.SHIP:
                if holds.get(dest.name, 0) > 0:
                    holds[dest.name] -= 1  # a kept slot: already counted in dest.reserved
                else:
                    dest.reserved += 1
                plan.setdefault(dest.name, []).append(rid)
        placed: set[str] = set()
        for dname, rids in plan.items():
            dest = next(i for i in fulls if i.name == dname)
            try:
                async with dest.lock:  # between the destination's steps: its KV cache is ours
                    if dest.closed:
                        continue
                    rep.kv_bytes_shipped += await ship_kv(cluster, src.server.pipe, dest.server.pipe, rids)
                    for rid in rids:
                        st, computed = moved[rid]
                        dest.server.add(rid, st, computed=computed)
                        placed.add(rid)
            except (NodeLostError, AgentRequestError):
                pass  # these requests recompute elsewhere
            finally:
                dest.reserved -= len(rids)
        rep.kv_shipped += len(placed)
        return placed

    def release_holds(holds: dict[str, int]) -> None:
        for dname, n in holds.items():
            if dname in instances:
                instances[dname].reserved -= n
        holds.clear()
        wake.set()

    async def dissolve(name: str, holds: dict[str, int] | None = None) -> None:
        holds = holds if holds is not None else {}
        inst = instances.pop(name, None)
        if inst is None:
            release_holds(holds)
            return
        async with inst.lock:  # between steps: no token of a step is half-delivered
            inst.closed = True
            try:
                await inst.server.drain()
                moved = inst.server.take_progress()
            except (NodeLostError, AgentRequestError):  # a stage's KV may be ahead of its request: recompute
                moved = {rid: (st, 0) for rid, st in inst.server.take().items()}
        rep.pipelines_dissolved += 1
        rep.requests_moved += len(moved)
        try:
            placed = await ship_to_full(inst, moved, holds)
        finally:
            release_holds(holds)  # kept slots not used by shipped KV go back to the queue
        rest = [(rid, st) for rid, (st, _) in moved.items() if rid not in placed]
        rep.kv_recomputed += len(rest)
        queue.extendleft(reversed(rest))  # back to the head, in order
        wake.set()
        await inst.server.pipe.dissolve()

    async def apply(plan: PipelinePlan) -> None:
        # Solo instances first, so the dissolved pipelines' requests find them; dissolutions
        # run in the background (each waits for its pipeline's step in flight) so a slow step
        # never delays the next decision.
        # When KV may ship, each new solo instance keeps slots for the dissolving pipelines'
        # requests (they are older than anything queued); unused slots are released at once.
        leaving = [n for n in (by_assignment.pop(p.assignment, None) for p in plan.dissolve) if n is not None]
        want = {n: len(instances[n].server.reqs) for n in leaving if n in instances}
        if kv_policy is KvPolicy.RECOMPUTE:
            want = {}
        kept: list[tuple[str, int]] = []  # (solo instance, slots kept) in start order
        for node in plan.solo:
            if node not in solo:
                keep = min(max_seqs, max(0, sum(want.values()) - sum(k for _, k in kept)))
                inst = await start_solo(node, reserve=keep)
                if inst is not None and keep:
                    kept.append((inst.name, keep))
        for name in leaving:
            holds: dict[str, int] = {}
            need = want.get(name, 0)
            while need > 0 and kept:
                dname, k = kept[0]
                take = min(k, need)
                holds[dname] = holds.get(dname, 0) + take
                need -= take
                kept[0] = (dname, k - take)
                if kept[0][1] == 0:
                    kept.pop(0)
            background.add(asyncio.get_running_loop().create_task(dissolve(name, holds)))
        release_holds(dict(kept))  # slots kept for no one
        for p in plan.form:
            if any(n not in cluster.alive() for n in p.nodes):
                continue  # the planner does not know yet that a member died
            name = f"pipe{rep.pipelines_formed}"
            placements = [StagePlacement(st.node, (st.start, st.end)) for st in p.stages]
            try:
                await start_instance(name, placements)
            except (NodeLostError, AgentRequestError):
                continue  # a member died while forming; its requests never started here
            rep.pipelines_formed += 1
            by_assignment[p.assignment] = name
            if on_pipeline_formed is not None:
                on_pipeline_formed(name, [pl.node for pl in placements])
        wake.set()

    # full instances on the sources serve from the first moment
    for s in sources:
        await start_instance(f"src{s}", [StagePlacement(s, (0, manifest.n_blocks))])
    plans: asyncio.Queue[PipelinePlan | int] = asyncio.Queue()

    async def manager() -> None:
        while True:
            item = await plans.get()
            try:
                if isinstance(item, int):
                    await start_solo(item)
                else:
                    await apply(item)
            finally:
                plans.task_done()

    mgr = asyncio.get_running_loop().create_task(manager())
    try:
        if system is SystemKind.LOCAL:
            async def load(n: int) -> None:
                await cluster.request(n, HoldModel(req=0, model_dir=str(model_dir)))
                plans.put_nowait(n)
            await asyncio.gather(*(load(n) for n in receivers))
            rep.bytes_moved = 0
        else:
            await prepare_receivers(cluster, manifest, receivers)
            helpers = {s: rs.pipeline_helper_blocks for s in sources} if rs.pipeline_helper_blocks else None
            planner = PipelinePlanner(receivers, manifest.n_blocks, manifest.n_chunks, layout=manifest.layout,
                                      helpers=helpers) if system is SystemKind.LAMBDASCALE else None
            k = manifest.n_chunks

            def hook(ev, prog: MulticastProgress) -> None:
                if isinstance(ev, NodeLost):
                    # A dead receiver leaves the planner: pipelines through it dissolve (their
                    # requests are already back in the queue if a step failed) and a replacement
                    # is built from the survivors' holdings at once.
                    rep.nodes_lost_s.setdefault(ev.node, time.monotonic() - t0)
                    if planner is not None and (ev.node in planner.holdings() or ev.node in planner.helpers):
                        plan = planner.remove_node(ev.node)
                        if plan is not None:
                            plans.put_nowait(plan)
                    return
                if not isinstance(ev, ChunkHeld) or ev.node not in receivers:
                    return
                if planner is not None:
                    plan = planner.on_chunk(ev.node, ev.chunk)
                    if plan is not None:
                        plans.put_nowait(plan)
                elif len(prog.holdings[ev.node]) == k:
                    plans.put_nowait(ev.node)

            rep.multicast = await run_multicast(cluster, manifest, sources, receivers, _ALGO[system], on_event=hook)
            rep.bytes_moved = rep.multicast.bytes_moved
        await plans.join()  # every decision the multicast produced has been acted on
        await asyncio.gather(*background)
        missing = [n for n in receivers if n not in rep.node_serving_s and n in cluster.alive()]
        if missing:
            raise RuntimeError(f"nodes {missing} hold the model but never started serving alone")
        rep.all_solo_s = max(rep.node_serving_s.values(), default=0.0)
        await all_done.wait()
    finally:
        all_done.set()
        wake.set()
        mgr.cancel()
        tasks = [i.task for i in instances.values() if i.task is not None]
        await asyncio.gather(mgr, *tasks, *background, return_exceptions=True)
        for inst in instances.values():
            await inst.server.pipe.dissolve()
        rep.replayed_tokens = sum(x.replayed_tokens for x in servers)
        rep.replay_mismatches = sum(x.replay_mismatches for x in servers)
    return rep
