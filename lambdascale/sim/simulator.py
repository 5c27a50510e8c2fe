"""The cluster simulator: one system, one workload, one cluster, on simulated time.

Data flow per event (see the module map in docs/arch/sim.md)::

    arrival ──> gateway queue ──> control.router.dispatch (late binding) ──> instance ──> batch steps
    control tick ──> snapshot ──> control.autoscale ──> control.place ──> load / multicast
                                                   └──> control.manage_memory ──> evict / copy back
    multicast (pipe.plan_multicast) ──> rounds of flows on the Network ──> chunk lands
        ──> pipe.PipelinePlanner.on_chunk ──> form / dissolve λPipe pipelines ──> node full

The simulator owns *mechanism* only (moving bytes, running batches, bookkeeping); every decision
comes from the shared policies in ``lambdascale.control`` and ``lambdascale.pipe``.

:class:`Simulation` is the top of a stack of layers, one module each (:mod:`lambdascale.sim.state`
draws it): the state, the control plane's views of it (``views.py``), instances and their steps
(``instances.py``), arrivals and dispatch (``arrivals.py``), scale-outs with their multicasts,
pipelines and KV shipping (``scaleouts.py``, ``multicasts.py``); this module adds the controller
pass (observe -> decide -> act), the memory manager's actions, sampling and the run itself, and
``metrics.py`` turns a run into a :class:`SimResult`.

Costs: GPU-seconds = GPUs held by instances (from the moment a node is picked as a target, so
loading counts) integrated over time, until the simulation ends.
"""

from __future__ import annotations

from typing import Any

from lambdascale.control.autoscaler import autoscale
from lambdascale.control.decisions import CopyBack
from lambdascale.control.memory import manage_memory
from lambdascale.control.placement import place
from lambdascale.control.spec import InstanceState, Tier
from lambdascale.sim.events import Priority
from lambdascale.sim.metrics import ScaleRecord, SimResult, collect
from lambdascale.sim.network import Flow
from lambdascale.sim.scaleouts import ScaleOuts


class Simulation(ScaleOuts):
    """Replays ``workload`` against ``system`` on a cluster of ``settings.nodes`` nodes.

    Everything random was drawn when the workload was generated; the run itself is
    deterministic. All state is per instance (no globals), so simulations can run side by side.
    """

    # ---- control loop -----------------------------------------------------------------------

    def _tick(self) -> None:
        """The periodic controller pass; reschedules itself until every request finished."""
        self._control_pass()
        if not (self.arrived == len(self.reqs) and self.done == len(self.reqs)):
            self.loop.after(self.cfg.autoscale_interval_s, Priority.CONTROL, self._tick)
        else:
            self._finished = True

    def _control_pass(self) -> None:
        """Observe -> decide -> act: snapshot, autoscaler, placement, memory manager."""
        now = self.loop.now()
        snap = self.snapshot()
        changed = False
        for d in autoscale(snap, self.cfg, now):
            if d.add:
                plan = place(snap, d, self.cfg, now)
                if plan.targets:
                    self._execute(plan)
                    changed = True
            for iid in d.remove:
                self._remove(iid)
                changed = True
        if changed:
            self.last_scale_at = now
            snap = self.snapshot()
        if now >= self._next_memory:
            self._next_memory = now + self.s.memory_interval_s
            mem = manage_memory(snap, self.cfg, now)
            for e in mem.evictions:
                self._evict(e.node, e.tier)
            for c in mem.copy_backs:
                self._copy_back(c)
        self._pump()

    def _remove(self, iid: str) -> None:
        inst = self.insts.get(iid)
        if inst is None:
            return
        if inst.state is InstanceState.LOADING:
            inst.remove_when_full = True  # its node may be relaying a multicast; drop it once full
            return
        inst.state = InstanceState.DRAINING
        inst.view = None
        # Queued-but-not-started requests go back to the router.
        while inst.pending:
            self.held.appendleft(inst.pending.pop())
        self._maybe_release(inst)

    def _evict(self, node_id: int, tier: Tier) -> None:
        n = self.nodes[node_id]
        if tier is Tier.HOST:
            n.host = False
        elif tier is Tier.SSD:
            n.ssd = False

    def _copy_back(self, c: CopyBack) -> None:
        n = self.nodes[c.node]
        key = (c.node, c.to_tier)
        if key in self._copying:
            return
        if c.to_tier is Tier.HOST and not n.host:
            path: tuple[Any, ...] = (("d2h", c.node),)
            n.host_partial = True
        elif c.to_tier is Tier.SSD and not n.ssd:
            path = (("ssdw", c.node),)
            n.ssd_partial = True
        else:
            return
        self._copying.add(key)

        def done(_: Flow) -> None:
            self._copying.discard(key)
            if c.to_tier is Tier.HOST:
                n.host_partial, n.host, n.host_last_used = False, True, self.loop.now()
            else:
                n.ssd_partial, n.ssd = False, True

        self.net.start(path, c.nbytes, done, latency_s=0.0)

    # ---- sampling and run -------------------------------------------------------------------

    def _sample(self) -> None:
        now = self.loop.now()
        counted = sum(1 for i in self.insts.values() if i.state in (InstanceState.FULL, InstanceState.LOADING))
        pipes = sum(1 for i in self.insts.values() if i.state is InstanceState.PIPELINED)
        self.series.append((now, counted, pipes, self._arrivals_in_sample))
        self._arrivals_in_sample = 0
        if self.progress is not None:
            self.progress(now)
        if not self._finished:
            self.loop.after(self.s.sample_interval_s, Priority.REPORT, self._sample)

    def _start(self) -> None:
        """Initial state: ``floor`` warm instances on the first nodes; the model was served before,
        so systems that cache it in host memory hold a copy wherever the pool has room."""
        caches_host = self.cfg.memory_copy_back and Tier.HOST in self.spec.cache_tiers
        for node in self.nodes:
            node.host = caches_host and self.host_total[node.id] >= self.model.nbytes
        for i in range(self.spec.floor):
            node = self.nodes[i]
            self._alloc_gpu(node)
            node.chunks = set(range(self.model.n_chunks))
            node.inst = self._new_inst(InstanceState.FULL, ((i, 0, self.model.n_blocks),))
        for r in self.reqs:
            self.loop.schedule(r.arrival, Priority.ARRIVAL, self._arrive, r)
        self.loop.schedule(0.0, Priority.CONTROL, self._tick)
        self.loop.schedule(0.0, Priority.REPORT, self._sample)

    def run(self) -> SimResult:
        self._start()
        horizon = (float(self.w.arrival_s[-1]) if len(self.w) else 0.0) + self.s.drain_s
        end = self.loop.run(until=horizon)
        for n in self.nodes:
            if n.gpu_since is not None:
                self.gpu_seconds += (end - n.gpu_since) * self.model.tp
                n.gpu_since = end
        return collect(self.system.name, [r.arrival for r in self.reqs], [r.first_token for r in self.reqs],
                       [r.finish for r in self.reqs], [r.out for r in self.reqs], self.series,
                       self.s.sample_interval_s, gpu_seconds=self.gpu_seconds, end_time=end,
                       scale_events=self.scale_events, migrations=self.migrations, events=self.loop.processed,
                       kv_shipped=self.kv_shipped)


__all__ = ["ScaleRecord", "SimResult", "Simulation"]
