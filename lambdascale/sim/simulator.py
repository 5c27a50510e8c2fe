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
pipelines and KV shipping (``scaleouts.py``, ``multicasts.py``), nodes that leave and return
(``faults.py``); this module adds the controller pass (observe -> decide -> act), the memory
manager's actions, sampling and the run itself, and ``metrics.py`` turns a run into a
:class:`SimResult`.

Costs: GPU-seconds = GPUs held by instances (from the moment a node is picked as a target, so
loading counts) integrated over time, until the simulation ends.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lambdascale.control.autoscaler import autoscale
from lambdascale.control.decisions import CopyBack
from lambdascale.control.memory import manage_memory
from lambdascale.control.placement import place_model
from lambdascale.control.spec import InstanceState, Tier
from lambdascale.sim.events import Priority
from lambdascale.sim.faults import Faults
from lambdascale.sim.metrics import ModelStats, ScaleRecord, SimResult, collect
from lambdascale.sim.network import Flow
from lambdascale.sim.state import Inst, ModelRun, NodeState


class Simulation(Faults):
    """Replays ``workload`` against ``system`` on a cluster of ``settings.nodes`` nodes shared by
    every model of the catalogue.

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

    def _gpus_free_for(self, m: ModelRun) -> dict[int, int]:
        """Free GPUs placement may use for ``m``: one instance of a model per node (the
        simulator's unit), so a node already running one offers none and others at most one
        instance's worth."""
        need = m.model.tp
        return {n.id: (0 if m.name in n.insts else min(n.gpus_free, need)) for n in self.nodes}

    def _control_pass(self, only: ModelRun | None = None) -> None:
        """Observe -> decide -> act: snapshot, autoscaler, placement, memory manager (``only``:
        one model's decisions, the scale-from-zero kick)."""
        now = self.loop.now()
        snap = self.snapshot(only, active=True)
        for d in autoscale(snap, self.cfg, now):
            if not (d.add or d.remove):
                continue
            m = self.by_name[d.model]
            if d.add:
                view = snap.model(d.model)
                assert view is not None
                plan = place_model(snap, view, d.add, self.cfg, now, gpus_free=self._gpus_free_for(m))
                if plan.targets:
                    self._execute(plan)
                    m.last_scale_at = now
                    snap = self.snapshot(only, active=True)  # the next model's placement sees these GPUs taken
            for iid in d.remove:
                self._remove(iid)
                m.last_scale_at = now
        if only is None and now >= self._next_memory:
            self._next_memory = now + self.s.memory_interval_s
            todo = [n.id for n in self.nodes if n.version != n.mem_version or self._wants_copy_back(n)]
            mem = manage_memory(self.snapshot(), self.cfg, now, nodes=todo)
            for nid in todo:
                self.nodes[nid].mem_version = self.nodes[nid].version
            for e in mem.evictions:
                self._evict(e.node, e.model, e.tier)
            for c in mem.copy_backs:
                self._copy_back(c)
        self._pump(only)

    def _wants_copy_back(self, n: NodeState) -> bool:
        """A copy-back rule 3 of ``control.memory`` may still start on ``n``: the only part of a
        node's memory plan that can change while the node itself does not (a victim's keep-alive
        expires, models' recency moves). Other nodes whose state did not change since their last
        plan are left out of the memory pass: their plan is the one already carried out."""
        if not self.cfg.memory_copy_back:
            return False
        tiers = self.system.cache_tiers
        for name in n.insts:
            m = self.by_name[name]
            if len(n.chunks.get(name, ())) != m.model.n_chunks:
                continue
            if (Tier.HOST in tiers and name not in n.host and name not in n.host_partial
                    and m.model.nbytes <= n.host_total):
                return True
            if Tier.SSD in tiers and name not in n.ssd and name not in n.ssd_partial and m.model.nbytes <= n.ssd_total:
                return True
        if Tier.SSD in tiers:
            return any(name not in n.ssd and name not in n.ssd_partial for name in n.host)
        return False

    def _remove(self, iid: str) -> None:
        inst = self.insts.get(iid)
        if inst is None:
            return
        if inst.state is InstanceState.LOADING:
            inst.remove_when_full = True  # its node may be relaying a multicast; drop it once full
            return
        inst.state = InstanceState.DRAINING
        self._dirty(inst)
        # Queued-but-not-started requests go back to the router.
        while inst.pending:
            inst.m.held.appendleft(inst.pending.pop())
        self._maybe_release(inst)

    def _evict(self, node_id: int, model: str, tier: Tier) -> None:
        """The memory manager's eviction of ``model``'s copy in ``tier`` (never one in use:
        ``control.memory`` guarantees it)."""
        n = self.nodes[node_id]
        m = self.by_name[model]
        if tier is Tier.GPU and model in n.chunks and model not in n.insts:
            del n.chunks[model]  # a device copy kept through a pause, no instance on it (sim/faults.py)
        elif tier is Tier.HOST and model in n.host:
            del n.host[model]
            n.host_used -= m.model.nbytes
        elif tier is Tier.SSD and model in n.ssd:
            n.ssd.discard(model)
            n.ssd_used -= m.model.nbytes
        else:
            return
        m.evictions += 1
        self.evictions += 1
        self._touch(n)

    def _copy_back(self, c: CopyBack) -> None:
        """Copy ``c.model``'s weights to ``c.to_tier`` in the background (GPU -> host over the
        node's PCIe, host -> SSD on its NVMe); the room is reserved while it runs."""
        n = self.nodes[c.node]
        m = self.by_name[c.model]
        key = (c.node, c.model, c.to_tier)
        nb = m.model.nbytes
        if key in self._copying:
            return
        if c.to_tier is Tier.HOST and c.model not in n.host and c.model not in n.host_partial:
            if n.host_used + nb > n.host_total:
                return
            path: tuple[Any, ...] = (("d2h", c.node),)
            n.host_partial.add(c.model)
            n.host_used += nb
        elif c.to_tier is Tier.SSD and c.model not in n.ssd and c.model not in n.ssd_partial:
            if n.ssd_used + nb > n.ssd_total:
                return
            path = (("ssdw", c.node),)
            n.ssd_partial.add(c.model)
            n.ssd_used += nb
        else:
            return
        self._copying.add(key)
        self._touch(n)

        def done(_: Flow) -> None:
            self._copying.discard(key)
            # a copy whose node crashed meanwhile lost its partial copy (sim/faults.py): nothing lands
            if c.to_tier is Tier.HOST and c.model in n.host_partial:
                n.host_partial.discard(c.model)
                n.host[c.model] = self.loop.now()
            elif c.to_tier is Tier.SSD and c.model in n.ssd_partial:
                n.ssd_partial.discard(c.model)
                n.ssd.add(c.model)
            self._touch(n)

        self.net.start(path, nb, done, latency_s=0.0, cap=self.pcie_Bps if c.to_tier is Tier.HOST else None)

    # ---- sampling and run -------------------------------------------------------------------

    def _sample(self) -> None:
        now = self.loop.now()
        counted = sum(1 for i in self.insts.values() if i.state in (InstanceState.FULL, InstanceState.LOADING))
        pipes = sum(1 for i in self.insts.values() if i.state is InstanceState.PIPELINED)
        self.series.append((now, counted, pipes, self._arrivals_in_sample))
        gpus = sum(n.gpus_total for n in self.nodes)
        host = sum(n.host_total for n in self.nodes)
        ssd = sum(n.ssd_total for n in self.nodes)
        self.mem_series.append((now, sum(n.gpus_total - n.gpus_free for n in self.nodes) / max(1, gpus),
                                sum(n.host_used for n in self.nodes) / host if host else 0.0,
                                sum(n.ssd_used for n in self.nodes) / ssd if ssd else 0.0))
        self._arrivals_in_sample = 0
        if self.progress is not None:
            self.progress(now)
        if not self._finished:
            self.loop.after(self.s.sample_interval_s, Priority.REPORT, self._sample)

    def _put_host(self, node: NodeState, m: ModelRun, at: float = 0.0) -> bool:
        """Place a complete host copy of ``m`` on ``node`` if its pool has room."""
        nb = m.model.nbytes
        if m.name in node.host or node.host_used + nb > node.host_total:
            return False
        node.host[m.name] = at
        node.host_used += nb
        self._touch(node)
        return True

    def _warm(self, node: NodeState, m: ModelRun) -> Inst:
        """A full instance of ``m`` on ``node`` from the start (``min_instances``, sources)."""
        inst = self._own_inst(node, m, InstanceState.FULL)
        node.chunks[m.name] = set(range(m.model.n_chunks))
        self._dirty(inst)
        return inst

    def _start(self) -> None:
        """Initial state. Every model was served before: systems that cache in host memory hold
        copies in each node's pool, most popular model first, as far as the pool holds them (the
        state an LRU pool settles in under that popularity; for one model: a copy wherever it
        fits). ``floor`` warm instances per model go to the first nodes with free GPUs."""
        caches_host = self.cfg.memory_copy_back and Tier.HOST in self.system.cache_tiers
        if caches_host:
            for m in sorted(self.models, key=lambda m: (-m.weight, m.idx)):
                for node in self.nodes:
                    self._put_host(node, m)
        for m in self.models:
            placed = 0
            for node in self.nodes:
                if placed >= m.spec.floor:
                    break
                if node.gpus_free >= m.model.tp and m.name not in node.insts:
                    self._warm(node, m)
                    placed += 1
        self._schedule_faults()
        for r in self.reqs:
            self.loop.schedule(r.arrival, Priority.ARRIVAL, self._arrive, r)
        self.loop.schedule(0.0, Priority.CONTROL, self._tick)
        self.loop.schedule(0.0, Priority.REPORT, self._sample)

    def run(self) -> SimResult:
        self._start()
        horizon = (float(self.w.arrival_s[-1]) if len(self.w) else 0.0) + self.s.drain_s
        end = self.loop.run(until=horizon)
        for inst in list(self.insts.values()) + [i for n in self.nodes for i in n.insts.values()]:
            if inst.gpu_since is not None:
                self.gpu_seconds += (end - inst.gpu_since) * inst.m.model.tp
                inst.gpu_since = end
        res = collect(self.system.name, [r.arrival for r in self.reqs], [r.first_token for r in self.reqs],
                      [r.finish for r in self.reqs], [r.out for r in self.reqs], self.series,
                      self.s.sample_interval_s, gpu_seconds=self.gpu_seconds, end_time=end,
                      scale_events=self.scale_events, migrations=self.migrations, events=self.loop.processed,
                      kv_shipped=self.kv_shipped)
        res.model_idx = np.array([r.m.idx if r.m is not None else 0 for r in self.reqs], dtype=np.int64)
        res.models = [ModelStats(m.name, m.shape, m.model.tp, m.weight, dict(m.starts),
                                 dict(m.bytes_by_tier), m.evictions) for m in self.models]
        res.evictions = self.evictions
        ms = np.array(self.mem_series, dtype=float).reshape(-1, 4)
        res.mem_t, res.mem_gpu, res.mem_host, res.mem_ssd = ms[:, 0], ms[:, 1], ms[:, 2], ms[:, 3]
        return res


__all__ = ["ScaleRecord", "SimResult", "Simulation"]
