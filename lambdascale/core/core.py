"""The serving core: one owner of queues, dispatch, units, scale-outs and memory plans on agents.

Everything that serves requests on a cluster of node agents goes through :class:`ServingCore`:

* **requests**: :meth:`submit` (a token state and a sink for its tokens) and :meth:`abort`;
  each model has one FIFO, drained only by late-binding dispatch (:mod:`lambdascale.core.dispatch`)
  before every step of every unit and whenever capacity may have appeared;
* **units**: full instances and λPipe pipelines run the same worker loop; a unit whose member
  dies mid-step hands its requests' token states back to the head of the queue (no token of the
  failed step was delivered, so nothing is lost or repeated);
* **the controller's actuator**: :meth:`scale_out` (:mod:`lambdascale.core.scaleout`: local
  loads, multicast, execute-while-load pipelines, lending, dissolution with KV shipped or
  recomputed), :meth:`remove_instances` (drain), :meth:`apply_memory` (on the agents);
* **observation**: :meth:`snapshot` (:mod:`lambdascale.core.snapshot`), the controller's input.

Adapters sit on top: the gateway's :class:`~lambdascale.serve.cluster_backend.ClusterBackend`
(OpenAI requests in, token events out) and ``lambdascale bench scale``
(:mod:`lambdascale.core.burst`: a burst fired while a scale-out plan runs, its baselines being
other plans for the same core). With ``autoscale`` the core runs the control plane's
:class:`~lambdascale.control.controller.Controller` over itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lambdascale.clock import Clock, MonotonicClock
from lambdascale.config import LambdaScaleConfig
from lambdascale.control.snapshot import ClusterSnapshot, DeploymentSpec, MemoryPlan, ScalePlan
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.core.dispatch import plan_dispatch
from lambdascale.core.memory import NodeMemory
from lambdascale.core.state import (
    UNIT_HISTORY,
    CoreSettings,
    CoreStats,
    Deployment,
    Finish,
    Request,
    RequestSink,
    TokenOut,
    Unit,
)
from lambdascale.engine.sampling import SamplingParams, TokenLogprobs
from lambdascale.errors import BackendUnavailableError, InvalidRequestError, LambdaScaleError, ModelNotServedError
from lambdascale.model.manifest import Manifest
from lambdascale.pipe.pipelines import Pipeline
from lambdascale.runtime.cluster import AgentRequestError, Cluster, MemberEvent
from lambdascale.runtime.messages import HoldModel, Warmup
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement, pipeline_batch
from lambdascale.tasks import log_failure

if TYPE_CHECKING:
    from lambdascale.core.scaleout import ScaleOut

log = logging.getLogger("lambdascale.core")


class ServingCore:
    """Serving on the agents of ``cluster``; see the module docstring.

    ``clock`` is injected (the controller and every recorded time use it). ``autoscale`` runs the
    controller (observe -> decide -> act every ``control.autoscale_interval_s``) once
    :meth:`start` is called; without it, scale-outs are whatever the caller asks for.
    """

    def __init__(self, cluster: Cluster, config: LambdaScaleConfig, clock: Clock | None = None,
                 autoscale: bool = False) -> None:
        self.cluster = cluster
        self.config = config
        self.settings = CoreSettings.from_config(config)
        self.clock: Clock = clock or MonotonicClock()
        self.autoscale = autoscale
        self.deployments: dict[str, Deployment] = {}
        self.requests: dict[str, Request] = {}
        self.stats = CoreStats()
        #: ended and live units, oldest first (bounded): reports read when each started and what it ran
        self.units_seen: deque[Unit] = deque(maxlen=UNIT_HISTORY)
        #: (model, request id, unit id) of every dispatch, oldest first (bounded; tests and debugging)
        self.dispatch_log: deque[tuple[str, str, str]] = deque(maxlen=10_000)
        #: called with every unit that starts serving (benchmarks inject faults from here)
        self.on_unit_started: list[Callable[[Unit], None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self.scale_outs: set[ScaleOut] = set()  # jobs still running
        self._serial = itertools.count()
        self.memory = NodeMemory(cluster, self.deployments, self.stats, self.spawn)
        # the router the gateway runs: the control plane's dispatch, late binding per serve.late_binding
        self._router_cfg = config.control.model_copy(update={"router_late_binding": config.serve.late_binding})
        self.controller: Any = None
        self._ctl_task: asyncio.Task[None] | None = None
        self._ctl_stop: asyncio.Event | None = None
        self._started = False
        cluster.watch(self._on_member)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm the agents (``serve.warm_agents``) and start the controller (``autoscale``)."""
        if self.settings.warm_agents:
            # Import torch and the stage code on every agent now, concurrently: on a cold agent the
            # first FormStage pays that import (about 1 s alone, 4-6 s when several agents import
            # on a loaded machine), which would otherwise land in the first request's TTFT.
            t0 = self.clock.now()
            await asyncio.gather(*(self.cluster.request(n, Warmup(req=0)) for n in self.cluster.alive()))
            log.info("node agents warmed (torch imported) in %.2f s", self.clock.now() - t0)
        self._started = True
        if self.autoscale:
            from lambdascale.control.controller import Controller

            self.controller = Controller(self.snapshot, self, self.config.control, self.clock)
            self._ctl_stop = asyncio.Event()
            self._ctl_task = asyncio.get_running_loop().create_task(self.controller.run(self._ctl_stop))

    async def close(self) -> None:
        """Stop the controller and every background task, then end every deployment."""
        if self._ctl_task is not None and self._ctl_stop is not None:
            # let the loop see stop and return by itself (cancelling it mid-wait would orphan its timers)
            self._ctl_stop.set()
            done, _ = await asyncio.wait({self._ctl_task}, timeout=5)
            if not done:
                self._ctl_task.cancel()
            await asyncio.gather(self._ctl_task, return_exceptions=True)
            self._ctl_task = None
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        for name in list(self.deployments):
            await self.undeploy(name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> "asyncio.Task[Any]":
        """A background task the core owns: cancelled on close; an error is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)

        def done(t: "asyncio.Task[Any]") -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed: %r", t.exception(), exc_info=t.exception())
        task.add_done_callback(done)
        return task

    # ---- membership (core/members.py) ----------------------------------------------------------
    def _on_member(self, ev: MemberEvent) -> None:
        from lambdascale.core.members import on_member

        on_member(self, ev)

    def _members_current(self, u: Unit) -> bool:
        return all(self.cluster.is_current(n, inc) for n, inc in u.members.items())

    @property
    def scale_outs_in_progress(self) -> int:
        """Scale-outs (local starts and multicasts) not finished yet (tests wait for 0)."""
        return len(self.scale_outs)

    # ---- deployments ------------------------------------------------------------------------------
    async def deploy(self, name: str, model_dir: Path, manifest: Manifest, spec: DeploymentSpec,
                     eos: frozenset[int], max_len: int, start_on: Sequence[int] | None = None) -> Deployment:
        """Serve ``name`` from the checkpoint in ``model_dir``.

        With the controller, one node's host tier is warmed now (so the first scale-out is a local
        load) and the call returns once ``min_instances`` serve. Without it, full instances start
        on ``start_on`` (default: the first ``max(1, min_instances)`` live nodes).
        """
        if name in self.deployments:
            self.deployments[name].spec = spec
            return self.deployments[name]
        d = Deployment(name, spec, Path(model_dir), manifest, eos, max_len)
        if self.autoscale and "host" in [t.value for t in spec.cache_tiers] and \
                not any(name in h for h in self.memory.held.values()):
            alive = self.cluster.alive()
            if alive:
                node = min(alive, key=lambda n: (len(self.memory.held.get(n, ())), n))
                try:
                    await self.cluster.request(node, HoldModel(req=0, model_dir=str(model_dir)),
                                               timeout=self.hold_timeout(manifest))
                    self.memory.mark_held(node, name)
                except AgentRequestError as e:  # host tier full (runtime.host_capacity_gb): first start loads from the store
                    log.warning("deploy of %s: host tier of node %d not warmed: %s", name, node, e)
        self.deployments[name] = d  # visible to the controller only once its host copy is known
        self.kick()
        if self.autoscale:
            deadline = self.clock.now() + self.config.runtime.request_timeout_s
            while len(d.serving) < spec.min_instances:
                if self.clock.now() > deadline or not self.cluster.alive():
                    raise BackendUnavailableError(
                        f"model {name!r}: {len(d.serving)} of min_instances={spec.min_instances} instances "
                        f"started within runtime.request_timeout_s")
                await asyncio.sleep(0.05)
            return d
        nodes = list(start_on) if start_on is not None else self.cluster.alive()[:max(1, spec.min_instances)]
        await asyncio.gather(*(self.start_instance(d, n) for n in nodes))
        return d

    async def undeploy(self, name: str) -> None:
        d = self.deployments.pop(name, None)
        if d is None:
            return
        for u in d.units:
            u.alive = False
            if u.task is not None:
                u.task.cancel()
                await asyncio.gather(u.task, return_exceptions=True)
            if u.server is not None:
                await u.server.abandon()  # steps the cancelled worker had in flight
            if u.pipe is not None:
                await u.pipe.dissolve()  # best effort: a lost node has nothing to free
        err = BackendUnavailableError(f"model {name!r} was undeployed or the backend closed")
        for r in [r for r in self.requests.values() if r.model == name]:
            self._end(r, err)

    def deployment(self, model: str) -> Deployment:
        d = self.deployments.get(model)
        if d is None:
            raise ModelNotServedError(f"model {model!r} is not deployed on the cluster")
        return d

    # ---- requests ---------------------------------------------------------------------------------
    def submit(self, model: str, rid: str, prompt: Sequence[int], params: SamplingParams, seed: int,
               sink: RequestSink, output: Sequence[int] = ()) -> Request:
        """Queue a request; its tokens (and at most one final exception) go to ``sink`` in order.

        Raises :class:`ModelNotServedError` for an unknown model and
        :class:`BackendUnavailableError` when no unit is left and none can start.
        """
        d = self.deployment(model)
        alive = set(self.cluster.alive())
        if not any(n in alive for u in d.units for n in u.nodes) and not self.can_start(d):
            raise BackendUnavailableError(f"no instance of model {model!r} is left and none can start")
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in flight")
        d.last_request_at = self.clock.now()  # held in the queue while an instance starts (scale from zero)
        r = Request(rid, model, tuple(prompt), params, seed, list(output), sink)
        self.requests[rid] = r
        d.queue.append(rid)
        d.wakeup.set()
        if not d.units:
            self.kick()  # decide now rather than at the next tick: the first token waits on this start
        return r

    def hold_timeout(self, manifest: Manifest) -> float:
        """How long a ``HoldModel`` of ``manifest`` may take: ``runtime.request_timeout_s`` on top of
        twice its read through the SSD cap (``transfer.ssd_gbps``). A 1.26 GB model at 0.047 Gbit/s
        reads for 214 s: with the request timeout alone (120 s by default) a healthy node loading
        it was reported as not answering (issue 19), and the whole ``bench scale`` run was lost."""
        gbps = self.config.transfer.ssd_gbps
        read_s = manifest.total_bytes * 8 / (gbps * 1e9) if gbps else 0.0
        return self.config.runtime.request_timeout_s + 2 * read_s

    def abort(self, rid: str) -> None:
        """Forget a request wherever it is (queued, or admitted: its KV is freed by a later step)."""
        r = self.requests.pop(rid, None)
        for d in self.deployments.values():
            if rid in d.queue:
                d.queue.remove(rid)
            for u in d.units:
                if u.server is not None:
                    u.server.drop(rid)
        if r is not None:
            r.done = True

    def _end(self, r: Request, item: BaseException) -> None:
        if not r.done:
            r.done = True
            r.sink(item)
        self.requests.pop(r.rid, None)

    def _token_sink(self, unit_id: str) -> Callable[[str, int], None]:
        def on_token(rid: str, tok: int) -> None:
            r = self.requests.get(rid)
            if r is None or r.done:
                return
            d = self.deployments.get(r.model)
            if d is None:  # undeployed while a step was in flight
                return
            r.out.append(tok)
            p = r.params
            stop = tok in p.stop_token_ids or (not p.ignore_eos and tok in d.eos)
            length = len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= d.max_len
            reason = Finish.STOP if stop else (Finish.LENGTH if length else None)
            if reason is not None:
                r.done = True
                self.requests.pop(rid, None)
            lps, r.next_logprobs = r.next_logprobs, None
            plps: tuple[TokenLogprobs, ...] = ()
            if len(r.out) == 1 and r.params.prompt_logprobs is not None and len(r.prompt_lps) >= len(r.prompt) - 1:
                plps = tuple(r.prompt_lps[p] for p in range(1, len(r.prompt)))
            r.sink(TokenOut(tok, len(r.out) - 1, reason, unit_id, lps, plps))
        return on_token

    def _on_prompt_logprobs(self, rid: str, start: int, lps: tuple[TokenLogprobs, ...]) -> None:
        r = self.requests.get(rid)
        if r is not None and not r.done:  # a prefill redone after a move writes the same positions again
            r.prompt_lps.update({start + k: lp for k, lp in enumerate(lps)})

    def _on_logprobs(self, rid: str, lps: TokenLogprobs) -> None:
        r = self.requests.get(rid)
        if r is not None and not r.done:
            r.next_logprobs = lps  # delivered with the token, which comes next (PipelineServer.on_logprobs)

    def dispatch(self, d: Deployment) -> int:
        """Late binding: hand queued requests of ``d`` to units that can start them now; returns how many."""
        while d.queue and (d.queue[0] not in self.requests or self.requests[d.queue[0]].done):
            d.queue.popleft()  # aborted or finished while queued
        if not d.queue:
            return 0
        moves = plan_dispatch(d, self.requests, self._router_cfg, self.clock.now(), self.settings.kv_move)
        for rid, u in moves:
            assert u.server is not None
            d.queue.remove(rid)
            u.server.add(rid, self.requests[rid].token_state())
            self.dispatch_log.append((d.name, rid, u.id))
            u.requests_taken += 1
            if u.first_request_at is None:
                u.first_request_at = self.clock.now()
        if moves:
            d.wakeup.set()  # a unit that was idle has work now
        return len(moves)

    def requeue(self, d: Deployment, rids: Sequence[str]) -> None:
        """Put moved requests back at the head of the queue, in order."""
        if rids:
            self.stats.requeued += len(rids)
            d.queue.extendleft(reversed(list(rids)))
            d.wakeup.set()

    # ---- units ------------------------------------------------------------------------------------
    def _new_unit(self, d: Deployment, node: int) -> Unit:
        """A placeholder full instance of ``d`` on ``node`` while it loads."""
        u = Unit(f"{d.name}@{node}", d.name, node, loading=True)
        d.units.append(u)
        return u

    async def start_instance(self, d: Deployment, node: int, unit: Unit | None = None,
                             timeline: ScaleTimeline | None = None) -> Unit:
        """Load ``d`` on ``node`` (a hit when its buffers hold it already), form a full instance, serve.

        Raises the agents' errors; the placeholder ``unit`` then leaves the deployment.
        """
        u = unit if unit is not None else self._new_unit(d, node)
        try:
            if not self.memory.holds(node, d.name):
                await self.cluster.request(node, HoldModel(req=0, model_dir=str(d.model_dir), tier="gpu", reuse=True),
                                           timeout=self.hold_timeout(d.manifest))
                self.memory.mark_held(node, d.name)
            if timeline is not None:
                timeline.mark_node_full(node, self.clock.now())
            await self._form(d, u, [StagePlacement(node, (0, d.manifest.n_blocks))])
        except BaseException:
            if u in d.units:
                d.units.remove(u)
            raise
        if timeline is not None:
            timeline.mark_first_pipeline(self.clock.now())
        log.info("instance of %s serving on node %d", d.name, node)
        return u

    async def start_pipeline(self, d: Deployment, pl: Pipeline, timeline: ScaleTimeline | None = None,
                             helpers: frozenset[int] = frozenset()) -> Unit:
        """Form one λPipe pipeline (stage i on a node holding blocks of stage i, or on one of the
        ``helpers`` serving the model alone) and serve on it. Raises the agents' errors."""
        stages = tuple((st.node, st.start, st.end) for st in pl.stages)
        placements = [StagePlacement(n, (a, b)) for n, a, b in stages]
        u = Unit(f"{d.name}@pipe{next(self._serial)}", d.name, placements[0].node, stages=stages,
                 helpers=helpers & {p.node for p in placements})
        await self._form(d, u, placements)
        d.units.append(u)
        self.stats.pipelines_formed += 1
        if timeline is not None:
            timeline.mark_first_pipeline(self.clock.now())
        log.info("pipeline %s of %s serving across nodes %s", u.id, d.name, list(u.nodes))
        return u

    async def _form(self, d: Deployment, u: Unit, placements: list[StagePlacement]) -> None:
        s = self.settings
        seqs, step_tokens = pipeline_batch(placements, d.manifest, s.max_seqs, s.max_step_tokens, s.pipeline_batch)
        u.members = {p.node: self.cluster.incarnation(p.node) for p in placements}
        pipe = RemotePipeline(self.cluster, d.manifest, placements, max_len=d.max_len, max_seqs=seqs,
                              max_step_tokens=step_tokens, name=f"{u.id}.{next(self._serial)}",
                              emulate_device=s.emulate_device, device=s.device, dtype=s.dtype,
                              batch_invariant=s.batch_invariant, microbatches=s.microbatches)
        t0 = self.clock.now()
        await pipe.form()
        u.forming_s = self.clock.now() - t0
        u.pipe, u.server = pipe, PipelineServer(pipe, d.eos, on_token=self._token_sink(u.id),
                                                   on_logprobs=self._on_logprobs,
                                                   on_prompt_logprobs=self._on_prompt_logprobs)
        u.loading = False
        u.started_at = self.clock.now()
        self.units_seen.append(u)
        u.task = asyncio.get_running_loop().create_task(self._worker(d, u))
        u.task.add_done_callback(log_failure(f"the worker of unit {u.id}", log))
        d.wakeup.set()
        for hook in self.on_unit_started:
            hook(u)

    async def _worker(self, d: Deployment, u: Unit) -> None:
        srv = u.server
        assert srv is not None and u.pipe is not None
        while u.alive:
            if not self._members_current(u):  # a member died (or came back as a new incarnation)
                await srv.drain(suppress=True)
                gone = sorted(n for n, inc in u.members.items() if not self.cluster.is_current(n, inc))
                await self._lose(d, u, LambdaScaleError(f"node(s) {gone} declared dead"))
                return
            if u.draining and not srv.busy:
                u.alive = False
                if u in d.units:
                    d.units.remove(u)
                await u.pipe.dissolve()
                log.info("instance %s of %s removed (scale-in)", u.id, d.name)
                return
            self.dispatch(d)
            if not srv.busy:
                d.wakeup.clear()
                await d.wakeup.wait()
                continue
            try:
                async with u.lock:
                    if not u.alive:  # dissolved while we waited: its requests were moved
                        return
                    await srv.step()
            except InvalidRequestError as e:  # a prompt that does not fit one step: fail that request only
                budget = u.pipe.max_step_tokens
                for rid, rq in list(srv.reqs.items()):
                    if len(rq.all_ids) - rq.computed > budget:
                        srv.drop(rid)
                        if rid in self.requests:
                            self._end(self.requests[rid], InvalidRequestError(str(e)))
                continue
            except LambdaScaleError as e:  # a member died or failed mid-step: the unit is gone
                await srv.drain(suppress=True)
                await self._lose(d, u, e)
                return
            srv.finished.clear()

    async def _lose(self, d: Deployment, u: Unit, err: Exception) -> None:
        """A unit's member died mid-step: requeue its requests with their token state (exact: no
        token of the failed step was delivered), or fail them when nothing can serve the model."""
        assert u.server is not None and u.pipe is not None
        u.alive = False
        if u in d.units:
            d.units.remove(u)
        if not u.pipelined:
            self.memory.forget(u.node, d.name)
        moved = list(u.server.take())
        self.stats.units_failed += 1
        self.stats.requests_moved += len(moved)
        log.warning("unit %s of %s lost (%s); %d request(s) to move", u.id, d.name, err, len(moved))
        if d.units or self.can_start(d):
            self.requeue(d, moved)
        else:
            fail = BackendUnavailableError(f"no instance of model {d.name!r} is left (node {u.node}: {err})")
            for rid in moved + list(d.queue):
                r = self.requests.get(rid)
                if r is not None:
                    self._end(r, fail)
            d.queue.clear()
        await u.pipe.dissolve()  # best effort on the survivors

    async def dissolve(self, d: Deployment, u: Unit) -> None:
        """End pipeline ``u`` between steps; its requests move with their KV or token state
        (:func:`lambdascale.core.dissolve.dissolve`)."""
        from lambdascale.core.dissolve import dissolve

        await dissolve(self, d, u)

    # ---- the controller's actuator (returns at once: the controller's loop must not block) -------
    def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None:
        """Start every target of ``plan`` (see :meth:`start_scale_out`)."""
        self.start_scale_out(plan, timeline)

    def start_scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> "ScaleOut | None":
        """Start ``plan`` in the background and return its :class:`~lambdascale.core.scaleout.ScaleOut`
        (None for an unknown model). Targets with a local copy load it; network targets receive the
        model by block multicast (``plan.algo``) from sources holding it, or load from the model
        store when there are none."""
        from lambdascale.core.scaleout import ScaleOut

        d = self.deployments.get(plan.model)
        if d is None:
            return None
        self.stats.scale_events["up"] = self.stats.scale_events.get("up", 0) + 1
        job = ScaleOut(self, d, plan, timeline)
        self.scale_outs.add(job)
        job.task = self.spawn(job.run())
        job.task.add_done_callback(lambda _: self.scale_outs.discard(job))
        return job

    def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None:
        """Drain: stop admitting; the worker ends the unit once its requests finished."""
        d = self.deployments.get(model)
        if d is None:
            return
        self.stats.scale_events["down"] = self.stats.scale_events.get("down", 0) + 1
        for u in d.units:
            if u.id in instance_ids:
                u.draining = True
        d.wakeup.set()

    def apply_memory(self, plan: MemoryPlan) -> None:
        self.memory.apply(plan)

    def kick(self) -> None:
        """An out-of-band controller pass (scale from zero, a new deployment). Safe next to the
        periodic loop: this actuator never awaits, so a pass runs atomically on the event loop."""
        if self.controller is not None:
            self.controller.step()

    def can_start(self, d: Deployment) -> bool:
        """Whether the controller may still start a unit of ``d`` (a live node without one)."""
        if not self.autoscale:
            return False
        used = {u.node for dd in self.deployments.values() for u in dd.units}
        return any(n not in used for n in self.cluster.healthy())

    # ---- observation ------------------------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        from lambdascale.core.snapshot import build_snapshot

        return build_snapshot(self)
