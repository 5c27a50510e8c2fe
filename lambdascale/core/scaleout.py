"""One scale-out of one model, executed on the agents: the mechanism of DESIGN.md in one place.

A :class:`ScaleOut` runs a :class:`~lambdascale.control.snapshot.ScalePlan`:

* targets with a local copy (GPU, host or SSD tier) load it and start a full instance; so do
  network targets when no source holds the model in memory (they read the model store);
* the other network targets receive the model by block multicast (``plan.algo``: binomial for
  λScale, a tree for FaaSNet, a ring for NCCL) from the sources; every verified chunk reaches the
  incremental :class:`~lambdascale.pipe.pipelines.PipelinePlanner` when the plan asks for
  execute-while-load (and ``serve.execute_while_load`` allows it). Pipelines across receivers
  form as soon as the receivers together hold every block, or, with
  ``runtime.pipeline_helper_blocks``, once the sources serving the model alone can run the
  blocks the receivers lack (they are the planner's helpers);
* a receiver that holds the whole model starts its full instance first, then the planner
  dissolves the pipelines through it: their requests' KV ships to full instances with free slots
  where that beats recomputing, the rest resume from the head of the queue with their token
  state (exact outputs either way);
* a node lost during the multicast leaves the planner (pipelines through it dissolve, a
  replacement is built from the survivors' holdings) and the multicast re-plans around it.

Baselines are plans too: FaaSNet and NCCL are ``execute_while_load=False`` with their
algorithms, ServerlessLLM-style local loading is targets with a local tier.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from lambdascale.control.snapshot import ScalePlan, Tier
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.core.state import Deployment, Unit
from lambdascale.errors import LambdaScaleError
from lambdascale.pipe.pipelines import PipelinePlan, PipelinePlanner
from lambdascale.pipe.serving import lending_helpers, pipeline_planner
from lambdascale.runtime.cluster import NodeLost
from lambdascale.runtime.messages import ChunkHeld
from lambdascale.runtime.multicast import MulticastProgress, MulticastResult, prepare_receivers, run_multicast

if TYPE_CHECKING:
    from lambdascale.core.core import ServingCore

log = logging.getLogger("lambdascale.core.scaleout")


class ScaleOut:
    """One running scale-out; ``task`` is its background task, ``result`` the multicast's outcome."""

    def __init__(self, core: "ServingCore", d: Deployment, plan: ScalePlan, timeline: ScaleTimeline) -> None:
        self.core = core
        self.d = d
        self.plan = plan
        self.timeline = timeline
        self.task: asyncio.Task[Any] | None = None
        self.result: MulticastResult | None = None
        self.error: BaseException | None = None
        self.started: set[int] = set()   # receivers whose full instance has been started
        self.pipes: dict[tuple[int, ...], Unit] = {}  # planner assignment -> its live pipeline
        self.formed = 0  # pipelines this scale-out formed
        self._dissolving: set[asyncio.Task[None]] = set()
        self._actions: asyncio.Queue[int | PipelinePlan] = asyncio.Queue()
        self._planner: PipelinePlanner | None = None
        self._helpers: dict[int, int] = {}

    async def run(self) -> None:
        core, d, plan = self.core, self.d, self.plan
        net = set(plan.network_targets)
        healthy = set(core.cluster.healthy())  # a dead or suspect node is never a source
        sources = [s.node for s in plan.sources
                   if core.memory.holds(s.node, d.name) and s.node not in net and s.node in healthy]
        via_multicast: list[tuple[int, Unit]] = []
        local: list[tuple[int, Unit]] = []
        for t in plan.targets:
            tier = t.local_tier.value if t.local_tier is not Tier.NONE else ("network" if sources else "store")
            core.stats.tier_hits[tier] = core.stats.tier_hits.get(tier, 0) + 1
            u = core._new_unit(d, t.node)
            (via_multicast if t.node in net and sources else local).append((t.node, u))
        starts = [asyncio.ensure_future(self._start_logged(n, u)) for n, u in local]
        try:
            if via_multicast:
                ewl = bool(plan.execute_while_load) and core.settings.execute_while_load
                log.info("scale-out of %s: multicast %s -> %s (%s, execute-while-load %s)", d.name, sources,
                         [n for n, _ in via_multicast], plan.algo.value, ewl)
                await self._multicast(sources, via_multicast, ewl)
        finally:
            await asyncio.gather(*starts, return_exceptions=True)

    async def _start_logged(self, node: int, u: Unit) -> None:
        try:
            await self.core.start_instance(self.d, node, u, self.timeline)
        except Exception as e:  # the next controller pass sees the missing instance and retries
            log.error("starting %s on node %d failed: %s", self.d.name, node, e,
                      exc_info=not isinstance(e, LambdaScaleError))

    async def _multicast(self, sources: list[int], targets: list[tuple[int, Unit]], ewl: bool) -> None:
        core, d = self.core, self.d
        receivers = [n for n, _ in targets]
        placeholder = dict(targets)
        serving = {u.node for u in d.serving if not u.pipelined}
        lend = core.settings.helper_blocks
        # sources serving the model alone may run stages of early pipelines (runtime.pipeline_helper_blocks)
        self._helpers = lending_helpers(sources, serving, lend)
        # none when no pipeline can form (one receiver pipelines only with a helper): the simulator's rule too
        self._planner = pipeline_planner(ewl, receivers, d.manifest.n_blocks, d.manifest.n_chunks, self._helpers,
                                         layout=d.manifest.layout)
        actor = asyncio.get_running_loop().create_task(self._act(placeholder))
        try:
            # no lock: multicasts of one model (disjoint receivers) run side by side, each its own run
            await prepare_receivers(core.cluster, d.manifest, receivers, d.model_dir)
            self.result = await run_multicast(core.cluster, d.manifest, sources, receivers, algo=self.plan.algo.value,
                                              on_event=self._hook)
            core.stats.bytes_multicast += self.result.bytes_moved
            for node in receivers:  # full nodes whose event was missed, if any
                if node not in self.result.lost:
                    self._actions.put_nowait(node)
            await self._actions.join()  # every decision the multicast produced has been acted on
            await asyncio.gather(*self._dissolving)
        except Exception as e:  # the next controller pass sees the missing instances and retries
            self.error = e
            log.error("multicast of %s from %s to %s failed: %s", d.name, sources, receivers, e)
        finally:
            actor.cancel()
            await asyncio.gather(actor, *self._dissolving, return_exceptions=True)
            for u in list(self.pipes.values()):  # every member is full now (or gone): serve alone
                await core.dissolve(d, u)
            self.pipes.clear()
            if self.formed:
                self.timeline.mark_dissolved(core.clock.now())
        for node, u in targets:
            if node not in self.started and u in d.units:
                d.units.remove(u)  # lost during the multicast

    def _hook(self, ev: Any, prog: MulticastProgress) -> None:
        """Every cluster event while the multicast runs (called synchronously: it only queues work)."""
        core, planner = self.core, self._planner
        if isinstance(ev, NodeLost):
            # A dead receiver or helper leaves the planner: pipelines through it dissolve (their
            # requests are already back in the queue if a step failed) and a replacement is built
            # from the survivors' holdings at once.
            if ev.node in prog.receivers or ev.node in prog.sources:
                core.stats.node_lost_at.setdefault(ev.node, core.clock.now())
            if planner is not None and (ev.node in planner.holdings() or ev.node in planner.helpers):
                p = planner.remove_node(ev.node)
                if p is not None:
                    self._actions.put_nowait(p)
            return
        if not (isinstance(ev, ChunkHeld) and ev.model == self.d.name and ev.node in prog.receivers):
            return
        now = core.clock.now()
        self.timeline.mark_first_chunk(now)
        if len(prog.holdings.get(ev.node, ())) == self.d.manifest.n_chunks:
            self.timeline.mark_node_full(ev.node, now)
            # the node's full instance first: a pipeline this dissolves ships its requests' KV there
            self._actions.put_nowait(ev.node)
        if planner is not None:
            p = planner.on_chunk(ev.node, ev.chunk)
            if p is not None:
                self._actions.put_nowait(p)

    async def _act(self, placeholder: dict[int, Unit]) -> None:
        """Apply the hook's decisions in order: full instances, dissolutions (started), new pipelines."""
        core, d = self.core, self.d
        while True:
            item = await self._actions.get()
            try:
                if isinstance(item, int):
                    if item not in self.started and item in core.cluster.alive():
                        self.started.add(item)
                        core.memory.mark_held(item, d.name)  # received into its buffers
                        await self._start_logged(item, placeholder[item])
                    continue
                for pl in item.dissolve:
                    u = self.pipes.pop(pl.assignment, None)
                    if u is not None:
                        # in the background: it waits for the pipeline's step in flight, while the
                        # next receivers' full instances start and can take its requests' KV
                        task = asyncio.ensure_future(core.dissolve(d, u))
                        self._dissolving.add(task)
                        task.add_done_callback(self._dissolving.discard)
                for pl in item.form:
                    if not all(n in core.cluster.alive() for n in pl.nodes):
                        continue  # the planner does not know yet that a member died
                    try:
                        u = await core.start_pipeline(d, pl, self.timeline, frozenset(self._helpers))
                    except LambdaScaleError as e:  # a member died while forming; no request started there
                        log.warning("pipeline %s of %s could not form: %s", pl.assignment, d.name, e)
                        continue
                    self.pipes[pl.assignment] = u
                    self.formed += 1
            finally:
                self._actions.task_done()
