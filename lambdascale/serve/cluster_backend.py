"""A :class:`ServingBackend` over the runtime's node agents, scaled by the control plane.

``start`` launches ``runtime.nodes`` agents (``LocalCluster``: local processes, or Ray) and runs
the control engineer's :class:`~lambdascale.control.controller.Controller` (observe -> decide ->
act every ``control.autoscale_interval_s``) with this backend as its actuator and
:meth:`ClusterBackend.snapshot` as its observation. ``scale_out`` loads the model into a target
node's host tier (skipped when it is still there from an earlier instance: a host-tier hit) and
forms a single-stage :class:`RemotePipeline` driven by a :class:`PipelineServer` (continuous
batching on the agent) and a worker task here; ``remove_instances`` drains. Every scale-out is a
``ScaleTimeline`` (decision, node full, first pipeline), logged by the gateway. Requests wait in
one FIFO per model at the gateway; a request for a model with no instance is held there while one starts (scale
from zero) unless no node can host one (503). Without autoscaling, ``deploy`` starts
``max(1, min_instances)`` instances itself.

The backend owns every request's token state (prompt, tokens streamed so far, params, seed). When
an agent dies, its instance is dropped and its requests go back to the head of the queue with
that state; another instance prefills prompt + outputs and continues at the same token index, so
the client's stream is exactly an uninterrupted run's. With ``engine.batch_invariant`` every
instance and pipeline runs the batch-invariant numerics and a moved request (dissolution, a dead
node) is replayed step by step instead of re-prefilled (``PipelineServer``), so its tokens equal a
single-node run's bitwise. When no instance is left and none can
start, every waiting request ends with :class:`BackendUnavailableError` (the gateway's 503).

Requests leave the FIFO only through :meth:`ClusterBackend._dispatch`, the control plane's
late-binding ``dispatch`` (same policy as the simulator). The memory manager's plans (evictions,
background copy-backs to host and the node's SSD) are applied on the agents by :meth:`apply_memory`,
and the snapshot's per-node tiers come from the agents' reports. One instance per node (one GPU slot). An aborted
request leaves its instance through ``PipelineServer.drop`` (its KV is freed once no step of it is
in flight).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdascale.clock import MonotonicClock
from lambdascale.config import LambdaScaleConfig
from lambdascale.errors import InvalidRequestError, LambdaScaleError
from lambdascale.serve.backend import (
    BackendStatus,
    BackendUnavailableError,
    FinishReason,
    GenerationRequest,
    InstanceInfo,
    InstanceState,
    ModelCapacity,
    ModelNotServedError,
    NodeInfo,
    Tier,
    TokenEvent,
)
from lambdascale.serve.codec import TokenizerCodec
from lambdascale.serve.schemas import DeploySpec

log = logging.getLogger("lambdascale.serve.cluster")

_SERIAL = itertools.count()


@dataclass
class _Request:
    """The backend's record of one request: its token state and its stream."""

    rid: str
    model: str
    prompt: tuple[int, ...]
    params: Any             # engine SamplingParams
    seed: int
    out: list[int]
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    done: bool = False

    def token_state(self) -> Any:
        from lambdascale.engine.sequence import TokenState

        return TokenState(self.prompt, tuple(self.out), self.params, self.seed)


@dataclass
class _Instance:
    model: str
    node: int
    pipe: Any               # RemotePipeline (None while loading)
    server: Any             # PipelineServer (None while loading)
    task: asyncio.Task[None] | None = None
    alive: bool = True
    loading: bool = False
    draining: bool = False
    id: str = ""
    stages: tuple[tuple[int, int, int], ...] = ()  # (node, first block, end block) of a λPipe pipeline
    helpers: frozenset[int] = frozenset()  # nodes lending it a stage while serving alone
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held for a step; dissolution waits for it

    @property
    def pipelined(self) -> bool:
        return len(self.stages) > 1

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(n for n, _, _ in self.stages)) if self.stages else (self.node,)


@dataclass
class _Model:
    name: str
    spec: DeploySpec
    model_dir: Path
    manifest: Any
    codec: TokenizerCodec
    eos: frozenset[int]
    queue: deque[str] = field(default_factory=deque)
    instances: list[_Instance] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    last_request_at: float | None = None

    @property
    def serving(self) -> list[_Instance]:
        """Instances that take requests (loaded, not draining)."""
        return [i for i in self.instances if not i.loading and not i.draining]


def _stage_dtype(config: LambdaScaleConfig) -> Any:
    """What the agents' stages compute in: ``engine.dtype``, where ``auto`` is float32 (CPU stages)."""
    return "float32" if config.engine.dtype == "auto" else config.engine.dtype


class ClusterBackend:
    """Serving on node agents; see the module docstring."""

    def __init__(self, config: LambdaScaleConfig, models_dir: str | Path | None = None,
                 n_nodes: int | None = None, autoscale: bool = True) -> None:
        self.config = config
        self.models_dir = Path(models_dir) if models_dir is not None else config.paths.models_dir
        self.n_nodes = n_nodes or config.runtime.nodes
        self._lc: Any = None
        self._models: dict[str, _Model] = {}
        self._reqs: dict[str, _Request] = {}
        self._held: dict[int, set[str]] = {}
        self.moves = 0
        #: dissolution's KV moves (runtime.kv_move): requests whose KV went to a full instance, or were requeued
        self.kv_moves: dict[str, int] = {"shipped": 0, "recomputed": 0}
        self.kv_bytes_shipped = 0
        self.autoscale = autoscale
        self._controller: Any = None
        self._ctl_task: asyncio.Task[None] | None = None
        self._ctl_stop: asyncio.Event | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._clock = MonotonicClock()
        self.scale_events: dict[str, int] = {}
        self.bytes_multicast = 0
        self.pipelines_formed = 0
        self.pipelines_dissolved = 0
        self.tier_hits: dict[str, int] = {}
        # memory manager (runtime/agent_memory.py): each agent's last HoldingsReport, and the memory tasks
        self._tiers: dict[int, Any] = {}
        self._mem_tasks: set[asyncio.Task[Any]] = set()
        self._mem_apply: asyncio.Task[Any] | None = None
        self._tiers_poll: asyncio.Task[Any] | None = None
        self.memory_ops: dict[str, int] = {"evicted": 0, "evict_refused": 0, "copy_backs": 0, "copy_back_refused": 0}
        # The router the gateway runs: the control plane's dispatch, late binding per serve.late_binding.
        self._router_cfg = config.control.model_copy(update={"router_late_binding": config.serve.late_binding})
        #: (model, request id, instance id) of every dispatch, oldest first (bounded; tests and debugging)
        self.dispatch_log: deque[tuple[str, str, str]] = deque(maxlen=10_000)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        from lambdascale.runtime.launcher import LocalCluster

        self._lc = LocalCluster(self.n_nodes, self.config.transfer, self.config.runtime)
        await self._lc.__aenter__()
        if self.config.serve.warm_agents:
            # Import torch and the stage code on every agent now, concurrently: on a cold agent the first
            # FormStage pays that import (about 1 s alone, 4-6 s when several agents import on a loaded
            # machine), which would otherwise land in the first request's TTFT on every scale from zero.
            from lambdascale.runtime.messages import Warmup

            t0 = self._clock.now()
            await asyncio.gather(*(self.cluster.request(n, Warmup(req=0)) for n in self.cluster.alive()))
            log.info("node agents warmed (torch imported) in %.2f s", self._clock.now() - t0)
        log.info("cluster of %d node agents up", self.n_nodes)
        if self.autoscale:
            from lambdascale.control.controller import Controller

            self._controller = Controller(self.snapshot, self, self.config.control, self._clock)
            self._ctl_stop = asyncio.Event()
            self._ctl_task = asyncio.get_running_loop().create_task(self._controller.run(self._ctl_stop))

    @property
    def cluster(self) -> Any:
        return self._lc.cluster

    def kill_node(self, node: int) -> None:
        """Fault injection: SIGKILL one agent."""
        self._lc.launcher.kill(node)

    async def close(self) -> None:
        if self._ctl_task is not None and self._ctl_stop is not None:
            # Let the loop see stop and return by itself (cancelling it mid-wait would orphan its timers).
            self._ctl_stop.set()
            done, _ = await asyncio.wait({self._ctl_task}, timeout=5)
            if not done:
                self._ctl_task.cancel()
            await asyncio.gather(self._ctl_task, return_exceptions=True)
            self._ctl_task = None
        for t in list(self._bg) + list(self._mem_tasks):
            t.cancel()
        await asyncio.gather(*self._mem_tasks, return_exceptions=True)
        await asyncio.gather(*self._bg, return_exceptions=True)
        for name in list(self._models):
            await self.undeploy(name)
        if self._lc is not None:
            await self._lc.__aexit__(None, None, None)
            self._lc = None

    # ---- models -----------------------------------------------------------------------------
    async def deploy(self, spec: DeploySpec) -> None:
        if spec.name in self._models:
            self._models[spec.name].spec = spec  # static instances in this version
            return
        from lambdascale.model.checkpoint import find_model
        from lambdascale.model.tokenizer import Tokenizer

        try:
            ckpt = find_model(self.models_dir, spec.name)
            tok = Tokenizer.from_dir(ckpt.tokenizer_dir)
        except LambdaScaleError as e:
            raise ModelNotServedError(str(e)) from None
        arch = ckpt.arch
        eos = {arch.eos_token_id} if isinstance(arch.eos_token_id, int) else set(arch.eos_token_id or [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        max_len = min(self.config.engine.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        codec = TokenizerCodec(tok, frozenset(eos), max_len, arch.vocab_size)
        m = _Model(spec.name, spec, Path(ckpt.dir), ckpt.manifest, codec, frozenset(eos))
        if self.autoscale and "host" in spec.tiers and not any(m.name in h for h in self._held.values()):
            # Warm one node's host tier now, so the first scale-out (from zero) is a local host-tier load.
            from lambdascale.runtime.messages import HoldModel

            alive = self.cluster.alive()
            if alive:
                node = min(alive, key=lambda n: (len(self._held.get(n, ())), n))
                from lambdascale.runtime.cluster import AgentRequestError

                try:
                    await self.cluster.request(node, HoldModel(req=0, model_dir=str(m.model_dir)))
                    self._held.setdefault(node, set()).add(m.name)
                except AgentRequestError as e:  # host tier full (runtime.host_capacity_gb): first start loads from the store
                    log.warning("deploy of %s: host tier of node %d not warmed: %s", m.name, node, e)
        self._models[spec.name] = m  # visible to the controller only once its host copy is known
        self._kick()
        if self.autoscale:
            # The controller starts the floor (min_instances); wait for it so the gateway is ready on return.
            deadline = self._clock.now() + self.config.runtime.request_timeout_s
            while len(m.serving) < spec.min_instances:
                if self._clock.now() > deadline or not self.cluster.alive():
                    raise BackendUnavailableError(
                        f"model {spec.name!r}: {len(m.serving)} of min_instances={spec.min_instances} instances "
                        f"started within runtime.request_timeout_s")
                await asyncio.sleep(0.05)
            return
        for node in self.cluster.alive()[:max(1, spec.min_instances)]:
            await self._start_instance(m, node)

    async def _start_instance(self, m: _Model, node: int, inst: _Instance | None = None,
                              timeline: Any = None) -> None:
        """Load ``m`` into ``node``'s host tier (from its SSD tier: the checkpoint), form a full instance, serve."""
        from lambdascale.runtime.messages import HoldModel
        from lambdascale.runtime.pipeline import (
            PipelineServer,
            RemotePipeline,
            StagePlacement,
        )

        if inst is None:
            inst = _Instance(m.name, node, None, None, loading=True, id=f"{m.name}@{node}")
            m.instances.append(inst)
        try:
            if m.name not in self._held.get(node, set()):
                await self.cluster.request(node, HoldModel(req=0, model_dir=str(m.model_dir), tier="gpu"))
                self._held.setdefault(node, set()).add(m.name)
            if timeline is not None:
                timeline.mark_node_full(node, self._clock.now())
            pipe = RemotePipeline(self.cluster, m.manifest, [StagePlacement(node, (0, m.manifest.n_blocks))],
                                  max_len=m.codec.context_length, max_seqs=self.config.engine.max_batch_size,
                                  max_step_tokens=self.config.engine.max_num_batched_tokens,
                                  name=f"{m.name}@{node}.{next(_SERIAL)}", dtype=_stage_dtype(self.config),
                                  batch_invariant=self.config.engine.batch_invariant)
            await pipe.form()
        except BaseException:
            if inst in m.instances:
                m.instances.remove(inst)
            raise
        if timeline is not None:
            timeline.mark_first_pipeline(self._clock.now())
        inst.pipe, inst.server = pipe, PipelineServer(pipe, m.eos, on_token=self._on_token)
        inst.loading = False
        inst.task = asyncio.get_running_loop().create_task(self._worker(m, inst))
        m.wakeup.set()
        log.info("instance of %s serving on node %d", m.name, node)

    # ---- the controller's actuator (called by control.Controller; returns quickly) ------------
    def scale_out(self, plan: Any, timeline: Any) -> None:
        """Start every target of ``plan`` and return at once (the controller's loop must not block).

        Targets with a local copy (``local_tier`` gpu/host/ssd) load it; the network targets receive
        the model by block multicast (``plan.algo``) from ``plan.sources`` that hold it in memory,
        or, with no such source, load from the checkpoint (the model store).
        """
        m = self._models.get(plan.model)
        if m is None:
            return
        self.scale_events["up"] = self.scale_events.get("up", 0) + 1
        net = set(plan.network_targets)
        sources = [s.node for s in plan.sources if m.name in self._held.get(s.node, set()) and s.node not in net]
        via_multicast: list[tuple[int, _Instance]] = []
        for t in plan.targets:
            tier = t.local_tier.value if t.local_tier.value != "none" else ("network" if sources else "store")
            self.tier_hits[tier] = self.tier_hits.get(tier, 0) + 1
            inst = _Instance(m.name, t.node, None, None, loading=True, id=f"{m.name}@{t.node}")
            m.instances.append(inst)
            if t.node in net and sources:
                via_multicast.append((t.node, inst))
            else:
                self._spawn(self._start_logged(m, t.node, inst, timeline))
        if via_multicast:
            ewl = bool(plan.execute_while_load) and self.config.serve.execute_while_load
            log.info("scale-out of %s: multicast %s -> %s (%s, execute-while-load %s)", m.name, sources,
                     [n for n, _ in via_multicast], plan.algo.value, ewl)
            self._spawn(self._multicast_then_start(m, sources, via_multicast, plan.algo.value, timeline, ewl))

    async def _start_logged(self, m: _Model, node: int, inst: _Instance, timeline: Any) -> None:
        try:
            await self._start_instance(m, node, inst, timeline)
        except Exception as e:  # the next controller pass sees the missing instance and retries
            log.error("starting %s on node %d failed: %s", m.name, node, e)

    @property
    def scale_outs_in_progress(self) -> int:
        """Background starts and multicasts not finished yet (tests wait for 0)."""
        return sum(1 for t in self._bg if not t.done())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _multicast_then_start(self, m: _Model, sources: list[int], targets: list[tuple[int, _Instance]],
                                    algo: str, timeline: Any, ewl: bool = False) -> None:
        """Multicast ``m`` to the targets, then serve on each.

        Milestones: first chunk, each node full, first pipeline. With execute-while-load (``ewl``)
        the incremental λPipe planner sees every verified chunk; pipelines across receivers form as
        soon as the receivers together hold every block (or, with ``runtime.pipeline_helper_blocks``,
        once the sources can run the blocks they lack) and serve from the shared queue; when a
        member holds the whole model its full instance starts and the planner dissolves them:
        their requests' KV ships to full instances with free slots where that is cheaper than
        recomputing, the rest go back to the head of the queue with their token state (exact
        outputs either way).
        """
        from lambdascale.pipe.pipelines import PipelinePlanner
        from lambdascale.runtime.messages import ChunkHeld
        from lambdascale.runtime.multicast import prepare_receivers, run_multicast

        receivers = [n for n, _ in targets]
        placeholder = dict(targets)
        k = m.manifest.n_chunks
        # sources serving the model alone may run stages of early pipelines (runtime.pipeline_helper_blocks)
        lend = self.config.runtime.pipeline_helper_blocks
        serving = {i.node for i in m.serving if not i.pipelined}
        helpers = {s: lend for s in sources if s in serving} if lend else {}
        # one receiver forms a pipeline only with a helper (it runs what the receiver lacks)
        planner = PipelinePlanner(receivers, m.manifest.n_blocks, k, layout=m.manifest.layout,
                                  helpers=helpers or None) \
            if ewl and (len(receivers) > 1 or helpers) else None
        actions: asyncio.Queue[Any] = asyncio.Queue()
        pipes: dict[tuple[int, ...], _Instance] = {}
        started: set[int] = set()

        def hook(ev: Any, prog: Any) -> None:
            if not (isinstance(ev, ChunkHeld) and ev.model == m.name and ev.node in placeholder):
                return
            now = self._clock.now()
            timeline.mark_first_chunk(now)
            if len(prog.holdings.get(ev.node, ())) == k:
                timeline.mark_node_full(ev.node, now)
                # the node's full instance first: a pipeline this dissolves ships its requests' KV there
                actions.put_nowait(ev.node)
            if planner is not None:
                p = planner.on_chunk(ev.node, ev.chunk)
                if p is not None:
                    actions.put_nowait(p)

        async def act() -> None:
            while True:
                item = await actions.get()
                try:
                    if isinstance(item, int):
                        if item not in started and item in self.cluster.alive():
                            started.add(item)
                            self._held.setdefault(item, set()).add(m.name)  # received into host buffers
                            await self._start_logged(m, item, placeholder[item], timeline)
                    else:
                        for pl in item.dissolve:
                            inst = pipes.pop(pl.assignment, None)
                            if inst is not None:
                                await self._dissolve(m, inst)
                        for pl in item.form:
                            if all(n in self.cluster.alive() for n in pl.nodes):
                                inst = await self._start_pipeline(m, pl, timeline, frozenset(helpers))
                                if inst is not None:
                                    pipes[pl.assignment] = inst
                finally:
                    actions.task_done()

        actor = asyncio.get_running_loop().create_task(act())
        try:
            # no lock: multicasts of one model (disjoint receivers) run side by side, each its own run
            await prepare_receivers(self.cluster, m.manifest, receivers)
            res = await run_multicast(self.cluster, m.manifest, sources, receivers, algo=algo, on_event=hook)
            self.bytes_multicast += res.bytes_moved
            for node in receivers:  # full nodes whose event was missed, if any
                if node not in res.lost:
                    actions.put_nowait(node)
            await actions.join()
        except Exception as e:  # the next controller pass sees the missing instances and retries
            log.error("multicast of %s from %s to %s failed: %s", m.name, sources, receivers, e)
            for node, inst in targets:
                if node not in started and inst in m.instances:
                    m.instances.remove(inst)
        finally:
            actor.cancel()
            await asyncio.gather(actor, return_exceptions=True)
            for inst in list(pipes.values()):  # every member is full now (or gone): serve alone
                await self._dissolve(m, inst)
        for node, inst in targets:
            if node not in started and inst in m.instances:
                m.instances.remove(inst)  # lost during the multicast

    async def _start_pipeline(self, m: _Model, pl: Any, timeline: Any,
                              helpers: frozenset[int] = frozenset()) -> _Instance | None:
        """Form one λPipe pipeline (stage i on a node holding blocks of stage i, or on one of the
        ``helpers`` serving the model alone) and serve on it."""
        from lambdascale.runtime.pipeline import (
            PipelineServer,
            RemotePipeline,
            StagePlacement,
            pipeline_batch,
        )

        placements = [StagePlacement(st.node, (st.start, st.end)) for st in pl.stages]
        name = f"{m.name}@pipe{next(_SERIAL)}"
        seqs, step_tokens = pipeline_batch(placements, m.manifest, self.config.engine.max_batch_size,
                                           self.config.engine.max_num_batched_tokens, self.config.runtime.pipeline_batch)
        pipe = RemotePipeline(self.cluster, m.manifest, placements, max_len=m.codec.context_length,
                              max_seqs=seqs, max_step_tokens=step_tokens, name=name,
                              dtype=_stage_dtype(self.config), batch_invariant=self.config.engine.batch_invariant,
                              microbatches=self.config.runtime.pipeline_microbatches)
        try:
            await pipe.form()
        except LambdaScaleError as e:
            log.warning("pipeline %s of %s could not form: %s", pl.assignment, m.name, e)
            return None
        timeline.mark_first_pipeline(self._clock.now())
        inst = _Instance(m.name, placements[0].node, pipe, PipelineServer(pipe, m.eos, on_token=self._on_token),
                         id=name, stages=tuple((p.node, p.blocks[0], p.blocks[1]) for p in placements),
                         helpers=helpers & {p.node for p in placements})
        m.instances.append(inst)
        inst.task = asyncio.get_running_loop().create_task(self._worker(m, inst))
        m.wakeup.set()
        self.pipelines_formed += 1
        log.info("pipeline %s of %s serving across nodes %s", name, m.name, list(inst.nodes))
        return inst

    async def _dissolve(self, m: _Model, inst: _Instance) -> None:
        """End a pipeline between steps. Each request's KV goes to a full instance with a free slot
        when shipping it is estimated cheaper than recomputing (``runtime.kv_move``); the others
        resume from their token state through the queue."""
        async with inst.lock:
            inst.alive = False
            await inst.server.drain(suppress=True)  # a failed step leaves its requests' state as it was
            progress = inst.server.take_progress()
            shipped = await self._ship_kv(m, inst, progress) if progress else set()
        moved = [rid for rid in progress if rid not in shipped]
        self.kv_moves["recomputed"] += sum(1 for rid in moved if progress[rid][1] > 0)
        if inst in m.instances:
            m.instances.remove(inst)
        if moved:
            self.moves += len(moved)
            m.queue.extendleft(reversed(moved))
            m.wakeup.set()
        if inst.task is not None:
            inst.task.cancel()
            await asyncio.gather(inst.task, return_exceptions=True)
        try:
            await inst.pipe.dissolve()
        except Exception:  # a member may be gone; nothing left to free there
            pass
        self.pipelines_dissolved += 1
        log.info("pipeline %s of %s dissolved; %d request(s) requeued, %d with their KV shipped",
                 inst.id, m.name, len(moved), len(shipped))

    async def _ship_kv(self, m: _Model, src: _Instance, progress: dict[str, tuple[Any, int]]) -> set[str]:
        """Ship the KV of the dissolving ``src``'s requests for which that beats recomputing, to
        full instances of ``m`` with free slots, while ``src``'s stages still hold it. Returns the
        requests placed (each continues with a decode step there); a failure leaves the rest to
        recompute."""
        from lambdascale.runtime.cluster import AgentRequestError, NodeLostError
        from lambdascale.runtime.kvmove import KvMove, KvMoveChooser, KvPolicy, ship_kv

        if KvPolicy(self.config.runtime.kv_move) is KvPolicy.RECOMPUTE:
            return set()
        chooser = KvMoveChooser.build(self.config.runtime, m.manifest.arch, _stage_dtype(self.config),
                                      self.config.transfer.link_gbps, self.config.runtime.emulate_device,
                                      self.config.engine.batch_invariant)
        fulls = [i for i in m.serving if i.alive and i.server is not None and not i.pipelined]
        free = {i.id: i.pipe.max_seqs - len(i.server.reqs) for i in fulls}
        plan: dict[str, list[str]] = {}
        for rid, (st, computed) in progress.items():
            r = self._reqs.get(rid)
            dest = max(fulls, key=lambda i: free[i.id], default=None)
            if r is None or r.done or dest is None or free[dest.id] <= 0:
                continue
            cost = chooser.choose(len(st.prompt_ids), computed, dest.server.prefill_tokens_per_s,
                                  dest.server.decode_step_s)
            if cost.choice is KvMove.SHIP:
                plan.setdefault(dest.id, []).append(rid)
                free[dest.id] -= 1
        placed: set[str] = set()
        for dest in (i for i in fulls if i.id in plan):
            rids = plan[dest.id]
            try:
                async with dest.lock:  # between the destination's steps: its KV cache is ours
                    if not dest.alive:
                        continue
                    self.kv_bytes_shipped += await ship_kv(self.cluster, src.pipe, dest.pipe, rids)
                    for rid in rids:
                        st, computed = progress[rid]
                        dest.server.add(rid, st, computed=computed)
                        self.dispatch_log.append((m.name, rid, dest.id))
                    placed.update(rids)
            except (NodeLostError, AgentRequestError) as e:  # these requests recompute elsewhere
                log.warning("shipping KV of %d request(s) of %s to %s failed (%s); they recompute", len(rids), m.name,
                            dest.id, e)
        self.kv_moves["shipped"] += len(placed)
        if placed:
            m.wakeup.set()
        return placed

    def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None:
        """Drain: stop admitting; the worker dissolves the pipeline once its requests finished."""
        m = self._models.get(model)
        if m is None:
            return
        self.scale_events["down"] = self.scale_events.get("down", 0) + 1
        for inst in m.instances:
            if inst.id in instance_ids:
                inst.draining = True
        m.wakeup.set()

    def apply_memory(self, plan: Any) -> None:
        """Apply a ``MemoryPlan`` on the agents in the background (evictions first, then copy-backs).

        Returns at once (the controller's pass must not block). While an earlier plan is still being
        applied this one is skipped: the next pass plans again from fresher holdings.
        """
        if plan.is_noop or (self._mem_apply is not None and not self._mem_apply.done()):
            return
        self._mem_apply = self._mem_spawn(self._apply_memory(plan))

    def _mem_spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._mem_tasks.add(task)
        task.add_done_callback(self._mem_tasks.discard)
        return task

    async def _apply_memory(self, plan: Any) -> None:
        from lambdascale.runtime.cluster import AgentRequestError, NodeLostError

        for e in plan.evictions:
            m = self._models.get(e.model)
            if m is not None and any(e.node in i.nodes for i in m.instances):
                continue  # an instance started there since the snapshot: its copy is in use now
            held = self._held.get(e.node, set())
            rep = self._tiers.get(e.node)
            # evicting this tier frees the node's buffers (no other in-memory tier claims them)
            last = rep is not None and e.model in held and e.model in rep.buffers and \
                set(rep.tiers_of(e.model)) - {"ssd"} == {e.tier.value}
            if last:
                held.discard(e.model)  # no start may count on these buffers from now on
            try:
                evicted, rep = await self.cluster.evict(e.node, e.model, e.tier.value)
            except AgentRequestError as err:  # in use on the agent: nothing was freed
                self.memory_ops["evict_refused"] += 1
                if last:
                    held.add(e.model)
                log.info("eviction of %s from node %d's %s tier refused: %s", e.model, e.node, e.tier.value, err)
                continue
            except NodeLostError:
                continue
            self._tiers[e.node] = rep
            if e.model not in rep.buffers:
                held.discard(e.model)
            self.memory_ops["evicted"] += int(evicted)
            log.info("evicted %s from node %d's %s tier (%s)", e.model, e.node, e.tier.value, e.reason.value)
        for cb in plan.copy_backs:
            if cb.model not in self._held.get(cb.node, set()) and cb.from_tier.value != "ssd":
                continue  # the node no longer holds it in memory
            try:
                started, rep = await self.cluster.copy_back(cb.node, cb.model, cb.to_tier.value)
            except AgentRequestError as err:
                self.memory_ops["copy_back_refused"] += 1
                log.info("copy-back of %s to node %d's %s tier refused: %s", cb.model, cb.node, cb.to_tier.value, err)
                continue
            except NodeLostError:
                continue
            self._tiers[cb.node] = rep
            if started:
                self.memory_ops["copy_backs"] += 1
                log.info("copy-back of %s on node %d: %s -> %s started", cb.model, cb.node, cb.from_tier.value,
                         cb.to_tier.value)

    async def refresh_tiers(self) -> None:
        """Ask every live agent for its holdings (the snapshot uses the latest reports)."""
        from lambdascale.runtime.cluster import NodeLostError

        nodes = self.cluster.alive()
        reps = await asyncio.gather(*(self.cluster.holdings(n) for n in nodes), return_exceptions=True)
        for n, rep in zip(nodes, reps):
            if isinstance(rep, NodeLostError):
                self._tiers.pop(n, None)
            elif not isinstance(rep, BaseException):
                self._tiers[n] = rep

    def _node_holdings(self, n: int, now: float) -> tuple[tuple[Any, ...], int, int, int, int] | None:
        """Node ``n``'s holdings from its agent's last report (None before the first one arrives).

        Tiers as the agent reports them (gpu = an instance's copy, host, ssd); ``in_use`` becomes
        ``pinned`` so the policy never asks to evict what the agent would refuse. A model the backend
        put in the node's buffers after that report counts as it did before agents reported tiers:
        a host copy, pinned until the next report says what it is.
        """
        from lambdascale.control.snapshot import Holding
        from lambdascale.control.snapshot import Tier as CTier

        rep = self._tiers.get(n)
        if rep is None:
            return None
        out = {(h.model, h.tier): Holding(h.model, CTier(h.tier), h.nbytes, last_used=now - h.idle_s,
                                          blocks=None if h.blocks is None else frozenset(h.blocks), pinned=h.in_use)
               for h in rep.holdings}
        for name in sorted(self._held.get(n, ())):
            mm = self._models.get(name)
            if mm is not None and not any(out.get((name, t)) and out[(name, t)].complete for t in ("gpu", "host")):
                out[(name, "host")] = Holding(name, CTier.HOST, mm.manifest.total_bytes, pinned=True)
        return (tuple(out.values()), rep.host_capacity_bytes, rep.host_free_bytes, rep.ssd_capacity_bytes, rep.ssd_free_bytes)

    def snapshot(self) -> Any:
        """The control plane's view of this cluster (one GPU slot per node, host-tier holdings)."""
        from lambdascale.control.snapshot import (
            ClusterSnapshot,
            Holding,
            InstanceView,
            ModelView,
            NodeView,
            Stage,
        )
        from lambdascale.control.snapshot import (
            InstanceState as CState,
        )
        from lambdascale.control.snapshot import (
            Tier as CTier,
        )

        alive = set(self.cluster.alive())
        busy = {i.node for m in self._models.values() for i in m.instances if not i.pipelined}
        host_total = 1 << 50
        nodes = []
        if self._tiers_poll is None or self._tiers_poll.done():  # fresh holdings for the next pass
            self._tiers_poll = self._mem_spawn(self.refresh_tiers())
        for n in sorted(alive):
            tiers = self._node_holdings(n, self._clock.now())
            if tiers is not None:
                hs, h_tot, h_free, s_tot, s_free = tiers
                nodes.append(NodeView(id=n, gpus_total=1, gpus_free=0 if n in busy else 1, host_bytes_total=h_tot,
                                      host_bytes_free=h_free, ssd_bytes_total=s_tot, ssd_bytes_free=s_free,
                                      holdings=hs))
                continue
            held = [self._models[name] for name in sorted(self._held.get(n, ())) if name in self._models]
            used = sum(mm.manifest.total_bytes for mm in held)
            nodes.append(NodeView(
                id=n, gpus_total=1, gpus_free=0 if n in busy else 1,
                host_bytes_total=host_total, host_bytes_free=host_total - used,
                holdings=tuple(Holding(mm.name, CTier.HOST, mm.manifest.total_bytes,
                                       last_used=mm.last_request_at or 0.0) for mm in held)))
        models = []
        for m in self._models.values():
            insts = []
            for i in m.instances:
                if any(n not in alive for n in i.nodes) or i.draining:
                    continue
                n_run = len(i.server.reqs) if i.server is not None else 0
                state = CState.LOADING if i.loading else (CState.PIPELINED if i.pipelined else CState.FULL)
                stages = tuple(Stage(n, a, b) for n, a, b in i.stages) or (Stage(i.node, 0, m.manifest.n_blocks),)
                insts.append(InstanceView(
                    id=i.id, model=m.name, state=state, stages=stages,
                    capacity=self.config.engine.max_batch_size, outstanding_requests=n_run))
            models.append(ModelView(
                name=m.name, spec=m.spec.to_control(), size_bytes=m.manifest.total_bytes,
                n_blocks=m.manifest.n_blocks, instances=tuple(insts), queue_len=len(m.queue),
                in_flight=sum(v.outstanding_requests for v in insts), last_request_at=m.last_request_at))
        return ClusterSnapshot(nodes=tuple(nodes), models=tuple(models))

    async def undeploy(self, name: str) -> None:
        m = self._models.pop(name, None)
        if m is None:
            return
        for inst in m.instances:
            inst.alive = False
            if inst.task is not None:
                inst.task.cancel()
                await asyncio.gather(inst.task, return_exceptions=True)
            if inst.pipe is None:
                continue
            try:
                await inst.pipe.dissolve()
            except Exception:  # the node may be gone already
                pass
        err = BackendUnavailableError(f"model {name!r} was undeployed or the backend closed")
        for r in [r for r in self._reqs.values() if r.model == name]:
            r.events.put_nowait(err)

    def codec(self, model: str) -> TokenizerCodec:
        m = self._models.get(model)
        if m is None:
            raise ModelNotServedError(f"model {model!r} is not deployed on the cluster")
        return m.codec

    # ---- the data path ----------------------------------------------------------------------
    def _on_token(self, rid: str, tok: int) -> None:
        r = self._reqs.get(rid)
        if r is None:
            return
        m = self._models.get(r.model)
        if m is None:  # undeployed while a step was in flight
            return
        r.out.append(tok)
        p = r.params
        stop = tok in p.stop_token_ids or (not p.ignore_eos and tok in m.eos)
        length = len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= m.codec.context_length
        reason = FinishReason.STOP if stop else (FinishReason.LENGTH if length else None)
        r.events.put_nowait(TokenEvent(tok, len(r.out) - 1, reason))
        if reason is not None:
            r.done = True

    async def _worker(self, m: _Model, inst: _Instance) -> None:
        srv = inst.server
        while inst.alive:
            if inst.draining and not srv.busy:
                inst.alive = False
                if inst in m.instances:
                    m.instances.remove(inst)
                try:
                    await inst.pipe.dissolve()
                except Exception:  # the node may be gone; nothing left to free
                    pass
                log.info("instance of %s on node %d removed (scale-in)", m.name, inst.node)
                return
            self._dispatch(m)
            if not srv.busy:
                m.wakeup.clear()
                await m.wakeup.wait()
                continue
            try:
                async with inst.lock:
                    if not inst.alive:  # dissolved while we waited: its requests were moved
                        return
                    await srv.step()
            except InvalidRequestError as e:  # a prompt that does not fit one step: fail that request only
                budget = inst.pipe.max_step_tokens
                for rid, rq in list(srv.reqs.items()):
                    if len(rq.all_ids) - rq.computed > budget:
                        srv.drop(rid)
                        if rid in self._reqs:
                            self._reqs[rid].events.put_nowait(InvalidRequestError(str(e)))
                continue
            except LambdaScaleError as e:  # node lost, agent error: the instance is gone
                await srv.drain(suppress=True)
                self._lose(m, inst, e)
                return
            srv.finished.clear()

    def _dispatch(self, m: _Model) -> int:
        """Late binding: hand queued requests of ``m`` to instances that can start them now.

        Called whenever capacity may have appeared (before every step of every instance, on a
        new request, on an instance or pipeline becoming routable, on requeue). The choice is the
        control plane's pure :func:`lambdascale.control.router.dispatch` (FIFO prefix, no
        overtaking; least outstanding work among instances with a free slot and room in their
        next step's prefill budget), the same policy the simulator runs. "Waiting" work of an
        instance = its admitted requests whose first step has not run (``computed == 0``).
        Returns how many requests were dispatched.
        """
        from lambdascale.control.router import QueuedRequest, Waiting, dispatch
        from lambdascale.control.snapshot import InstanceState as CState
        from lambdascale.control.snapshot import InstanceView, ModelView, Stage

        while m.queue and (m.queue[0] not in self._reqs or self._reqs[m.queue[0]].done):
            m.queue.popleft()  # aborted or finished while queued
        if not m.queue:
            return 0
        insts = {i.id: i for i in m.serving if i.alive and i.server is not None}
        if not insts:
            return 0
        views, waiting = [], {}
        kept = self._kept_for_pipelines(m, insts.values())
        for i in insts.values():
            reqs = list(i.server.reqs.values())
            fresh = [r for r in reqs if r.computed == 0]
            waiting[i.id] = Waiting(len(fresh), sum(len(r.all_ids) for r in fresh))
            todo = sum(len(r.all_ids) - r.computed + max(r.params.max_tokens - len(r.out), 0) for r in reqs)
            stages = tuple(Stage(n, a, b) for n, a, b in i.stages) or (Stage(i.node, 0, m.manifest.n_blocks),)
            views.append(InstanceView(id=i.id, model=m.name, state=CState.PIPELINED if i.pipelined else CState.FULL,
                                      stages=stages, capacity=i.pipe.max_seqs,
                                      outstanding_requests=len(reqs) + kept.get(i.id, 0), outstanding_tokens=todo,
                                      step_slots=i.pipe.slots))
        queue = []
        for rid in m.queue:
            r = self._reqs.get(rid)
            if r is None or r.done:
                continue
            n = len(r.prompt) + len(r.out)
            queue.append(QueuedRequest(rid, n, n + max(r.params.max_tokens - len(r.out), 0)))
        view = ModelView(name=m.name, spec=m.spec.to_control(), size_bytes=m.manifest.total_bytes,
                         n_blocks=m.manifest.n_blocks, instances=tuple(views), queue_len=len(queue))
        res = dispatch(queue, view, self._router_cfg, self._clock.now(), waiting)
        for a in res.assignments:
            m.queue.remove(a.request_id)
            insts[a.instance_id].server.add(a.request_id, self._reqs[a.request_id].token_state())
            self.dispatch_log.append((m.name, a.request_id, a.instance_id))
        if res.assignments:
            m.wakeup.set()  # an instance that was idle has work now
        return len(res.assignments)

    def _kept_for_pipelines(self, m: _Model, insts: Any) -> dict[str, int]:
        """Slots of full instances kept for the requests of a live pipeline over their node.

        When a pipeline dissolves its requests' KV can only ship to a full instance with a free
        slot, so while it runs, each of its receivers' full instances keeps its share (the
        pipeline's requests over its receivers, rounded up) away from the queue. Helpers (sources
        lending a stage) keep nothing: their instances serve the queue the whole time. With
        ``runtime.kv_move: recompute`` nothing is kept: moved requests go to the queue's head.
        """
        if self.config.runtime.kv_move == "recompute":
            return {}
        full_on = {i.node: i.id for i in insts if not i.pipelined}
        kept: dict[str, int] = {}
        for p in m.instances:
            if not (p.pipelined and p.alive and p.server is not None and p.server.reqs):
                continue
            receivers = [n for n in p.nodes if n not in p.helpers]
            share = -(-len(p.server.reqs) // max(1, len(receivers)))
            for n in receivers:
                if n in full_on:
                    kept[full_on[n]] = kept.get(full_on[n], 0) + share
        return kept

    def _lose(self, m: _Model, inst: _Instance, err: Exception) -> None:
        """An instance's node died: requeue its requests with their token state, or fail them."""
        inst.alive = False
        if inst in m.instances:
            m.instances.remove(inst)
        if not inst.pipelined:
            self._held.get(inst.node, set()).discard(m.name)
        moved = list(inst.server.take())
        log.warning("instance of %s on node %d lost (%s); %d request(s) to move", m.name, inst.node, err, len(moved))
        if m.instances or self._can_start(m):
            self.moves += len(moved)
            m.queue.extendleft(reversed(moved))
            m.wakeup.set()
            return
        fail = BackendUnavailableError(f"no instance of model {m.name!r} is left (node {inst.node}: {err})")
        for rid in moved + list(m.queue):
            r = self._reqs.get(rid)
            if r is not None:
                r.events.put_nowait(fail)
        m.queue.clear()

    def _kick(self) -> None:
        """An out-of-band controller pass (scale from zero, a new deployment).

        Safe next to the periodic loop: this actuator never awaits, so a pass runs atomically on
        the event loop and the two cannot interleave.
        """
        if self._controller is not None:
            self._controller.step()

    def _can_start(self, m: _Model) -> bool:
        """Whether the controller may still start an instance of ``m`` (a live node without one)."""
        if not self.autoscale or self._lc is None:
            return False
        used = {i.node for mm in self._models.values() for i in mm.instances}
        return any(n not in used for n in self.cluster.alive())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from lambdascale.engine.sampling import SamplingParams

        m = self._models.get(request.model)
        if m is None:
            raise ModelNotServedError(f"model {request.model!r} is not deployed on the cluster")
        alive = set(self.cluster.alive())
        if not any(i.node in alive for i in m.instances) and not self._can_start(m):
            raise BackendUnavailableError(f"no instance of model {request.model!r} is left and none can start")
        m.last_request_at = self._clock.now()  # held in the queue while an instance starts (scale from zero)
        sp = request.sampling
        params = SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                top_k=max(sp.top_k, 0), seed=sp.seed, stop_token_ids=sp.stop_token_ids,
                                ignore_eos=sp.ignore_eos)
        seed = sp.seed if sp.seed is not None else secrets.randbits(63)
        r = _Request(request.request_id, request.model, tuple(request.prompt_ids), params, seed, list(request.output_ids))
        self._reqs[r.rid] = r
        m.queue.append(r.rid)
        m.wakeup.set()
        if not m.instances:
            self._kick()  # decide now rather than at the next tick: the first token waits on this start
        finished = False
        try:
            while True:
                item = await r.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._reqs.pop(r.rid, None)
            if not finished:
                await self.abort(r.rid)

    async def abort(self, request_id: str) -> None:
        for m in self._models.values():
            if request_id in m.queue:
                m.queue.remove(request_id)
            for inst in m.instances:
                if inst.server is not None:
                    inst.server.drop(request_id)
        self._reqs.pop(request_id, None)

    # ---- observation ------------------------------------------------------------------------
    def capacity(self, model: str) -> ModelCapacity:
        m = self._models.get(model)
        if m is None:
            return ModelCapacity(0, 0, 0)
        return ModelCapacity(slots=sum(i.pipe.max_seqs for i in m.serving),
                             running=sum(len(i.server.reqs) for i in m.serving), queued=len(m.queue))

    def _node_tiers(self, n: int) -> dict[str, tuple[Tier, ...]]:
        """Which tiers hold each model on node ``n``, fastest first, from the agent's last report
        (the same holdings the control plane sees); before any report, the models the backend put
        in the node's buffers count as host copies."""
        tiers = self._node_holdings(n, self._clock.now())
        if tiers is None:
            return {mm: (Tier.HOST,) for mm in sorted(self._held.get(n, ()))}
        order = {Tier.GPU: 0, Tier.HOST: 1, Tier.SSD: 2}
        out: dict[str, set[Tier]] = {}
        for h in tiers[0]:
            out.setdefault(h.model, set()).add(Tier(h.tier.value))
        return {mm: tuple(sorted(ts, key=order.__getitem__)) for mm, ts in sorted(out.items())}

    def status(self) -> BackendStatus:
        alive = set(self.cluster.alive()) if self._lc is not None else set()
        return BackendStatus(
            nodes=tuple(NodeInfo(str(n), n in alive, self._node_tiers(n)) for n in range(self.n_nodes)),
            instances=tuple(InstanceInfo(
                i.id, m.name,
                InstanceState.LOADING if i.loading else (InstanceState.PIPELINED if i.pipelined else InstanceState.FULL),
                tuple(str(n) for n in i.nodes), len(i.server.reqs) if i.server is not None else 0)
                for m in self._models.values() for i in m.instances if all(n in alive for n in i.nodes)),
            queues={m.name: len(m.queue) for m in self._models.values()},
            bytes_multicast=self.bytes_multicast,
            kv_moves=dict(self.kv_moves),
            kv_bytes_shipped=self.kv_bytes_shipped,
            scale_events=dict(self.scale_events),
            tier_hits=dict(self.tier_hits),
            timeline=tuple(self._controller.timelines)[-50:] if self._controller is not None else (),
        )
