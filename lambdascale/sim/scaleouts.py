"""Scale-outs: executing a placement plan, and the λPipe pipelines that serve while it loads.

A plan's targets load from their local tier (GPU, host memory, SSD) or receive the model by
multicast (``pipe.plan_multicast``, played by :mod:`lambdascale.sim.multicasts`). Every chunk
that lands goes to the scale-out's ``pipe.PipelinePlanner``, which forms and dissolves
execute-while-load pipelines across the receivers (and the sources lending stages,
``pipe.serving.lending_helpers``).

Requests on a pipeline that is dissolved move, with their token state, to a full instance: their
KV cache ships there over the network when that is cheaper than recomputing it (the runtime's
rules, ``pipe.serving.choose_kv_move`` and ``kv_destination``; ``sim.kv_move``), else the
instance the router picks recomputes it (a prefill of prompt + generated tokens); either way the
stream continues and TTFT is unchanged, as the client saw its first token already (a micro-batch
whose prefill ended before the dissolution keeps its first token; one still in progress is
prefilled again).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from lambdascale.control.decisions import ScalePlan
from lambdascale.control.spec import InstanceState, Tier
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.pipe.multicast import plan_multicast
from lambdascale.pipe.pipeline_types import Pipeline
from lambdascale.pipe.pipelines import PipelinePlanner
from lambdascale.pipe.serving import KvMove, KvTarget, choose_kv_move, kv_destination, lending_helpers, pipeline_planner
from lambdascale.sim.arrivals import Arrivals
from lambdascale.sim.events import Priority
from lambdascale.sim.metrics import ScaleRecord
from lambdascale.sim.multicasts import ChunkMulticastRun, MulticastRun
from lambdascale.sim.network import Flow
from lambdascale.sim.state import ROUTABLE, Inst, ModelRun, NodeState, Req


class ScaleOuts(Arrivals):
    """Loads, multicasts, pipelines forming and dissolving, and KV caches shipped."""

    def _execute(self, plan: ScalePlan) -> ScaleRecord:
        """Start every load of a placement plan: local tiers, multicast, or the model store."""
        now = self.loop.now()
        m = self.by_name[plan.model]
        self._event_seq += 1
        targets = tuple(t.node for t in plan.targets)
        tl = ScaleTimeline(self._event_seq, m.name, now, targets)
        tiers: dict[str, int] = {}
        for t in plan.targets:
            tiers[t.local_tier.value] = tiers.get(t.local_tier.value, 0) + 1
        network = list(plan.network_targets)
        use_peers = bool(plan.sources) and bool(network) and self.system.peer_fetch
        rec = ScaleRecord(tl, len(targets), len(network) if use_peers else 0,
                          len(plan.sources) if use_peers else 0, plan.algo.value if use_peers else "local", tiers,
                          model=m.name)
        self.scale_events.append(rec)
        for t in plan.targets:
            node = self.nodes[t.node]
            self._own_inst(node, m, InstanceState.LOADING)
            node.timeline[m.name] = tl
        for t in plan.local_targets:
            self._local_load(self.nodes[t.node], m, t.local_tier)
        if network and not use_peers:
            for n in network:  # no peer fetch: the node's SSD copy, else the model store (SSD-speed)
                self._local_load(self.nodes[n], m, Tier.SSD)
        elif network:
            m.starts["network"] = m.starts.get("network", 0) + len(network)
            self._multicast(m, plan, tl)
        return rec

    def _count(self, m: ModelRun, tier: str, nbytes: float) -> None:
        m.bytes_by_tier[tier] = m.bytes_by_tier.get(tier, 0.0) + nbytes

    def _local_load(self, node: NodeState, m: ModelRun, tier: Tier) -> None:
        """Load ``m`` onto ``node``'s GPUs from its own ``tier``: GPU (already there), host memory
        (PCIe), or SSD (NVMe then PCIe; a node whose SSD lacks the model reads the model store at
        the same rate). An SSD read is staged in pinned host memory, and the copy stays there when
        the system caches in host memory and the pool has room for it *now* (reserved as a
        partial copy for the read's duration: the pool is never over-committed)."""
        K, nb, name = m.model.n_chunks, m.model.nbytes, m.name
        if tier is Tier.GPU:
            m.starts["gpu"] = m.starts.get("gpu", 0) + 1
            node.chunks[name] = set(range(K))
            self._touch(node)
            self.loop.after(0.0, Priority.STATE, self._node_full, node, m)
            return
        if tier is Tier.HOST:
            path: tuple[Any, ...] = (("pcie", node.id),)
            node.host[name] = self.loop.now()
            label = "host"
        else:
            path = (("ssd", node.id), ("pcie", node.id))
            label = "ssd" if name in node.ssd else "store"
        m.starts[label] = m.starts.get(label, 0) + 1
        stage = (tier is Tier.SSD and Tier.HOST in m.spec.cache_tiers and self.cfg.memory_copy_back
                 and name not in node.host and name not in node.host_partial
                 and node.host_used + nb <= node.host_total)
        if stage:
            node.host_partial.add(name)
            node.host_used += nb
        self._touch(node)
        own = node.insts.get(name)

        def done(_: Flow) -> None:
            self._count(m, label, nb)
            ours = node.insts.get(name) is own  # its instance is gone if its node died meanwhile (sim/faults.py)
            if ours and name in node.chunks:
                node.chunks[name] = set(range(K))
            if stage and name in node.host_partial:  # not lost with its node's memory meanwhile
                node.host_partial.discard(name)
                node.host[name] = self.loop.now()
            self._touch(node)
            if ours:
                self._node_full(node, m)

        self.net.start(path, nb, done, latency_s=0.0, cap=self.pcie_Bps)

    def _multicast(self, m: ModelRun, plan: ScalePlan, tl: ScaleTimeline) -> None:
        order = plan.multicast_nodes()
        model = m.model
        mc = plan_multicast(plan.algo.value, len(order), len(plan.sources), model.n_blocks, model.n_chunks,
                            layout=model.layout)
        receivers = [order[i] for i in mc.receiver_nodes]
        now = self.loop.now()
        for s in plan.sources:
            node = self.nodes[s.node]
            node.source_busy[m.name] = node.source_busy.get(m.name, 0) + 1
            if s.tier is Tier.HOST and m.name in node.host:
                node.host[m.name] = now
            self._touch(node)
        helpers = lending_helpers([s.node for s in plan.sources],
                                  {s.node for s in plan.sources if self._serving(self.nodes[s.node], m)},
                                  self.s.pipeline_helper_blocks)
        # the core's rule: none when no pipeline can form (one receiver pipelines only with a helper)
        planner = pipeline_planner(self.system.execute_while_load and plan.execute_while_load, receivers,
                                   model.n_blocks, model.n_chunks, helpers, layout=model.layout)
        if planner is not None:
            self._pipelines[tl.event_id] = (planner, tl, {}, set(receivers))
        srcs = [s.node for s in plan.sources]
        run = ChunkMulticastRun if self.s.multicast_mode == "chunk" else MulticastRun
        player = run(self.net, mc, order, model.chunk_bytes, self.nic_latency,
                     lambda node, chunk: self._on_chunk(node, m, chunk, tl, planner),
                     lambda: self._release_sources(m, srcs), cap=m.net_Bps)
        self.loop.after(self._transfer_start_s(plan, model.tp), Priority.TRANSFER, player.start)

    def _transfer_start_s(self, plan: ScalePlan, tp: int) -> float:
        """Seconds from the decision to the first chunk moving (``links.transfer_setup_s``, plus a
        collective's start-up for the ring broadcast of the NCCL baseline:
        ``links.nccl_init_per_rank_s`` per rank beyond the root, ranks = GPUs taking part)."""
        L = self.cluster.links
        t = L.transfer_setup_s
        if plan.algo.value == "ring":
            t += L.nccl_init_per_rank_s * (len(plan.multicast_nodes()) * tp - 1)
        return t

    def _release_sources(self, m: ModelRun, sources: list[int]) -> None:
        """A multicast ended: its sources' copies are free to go (a draining source's GPUs too)."""
        for s in sources:
            node = self.nodes[s]
            node.source_busy[m.name] -= 1
            self._touch(node)
            inst = node.insts.get(m.name)
            if inst is not None and inst.state is InstanceState.DRAINING:
                self._maybe_release(inst)

    def _on_chunk(self, node_id: int, m: ModelRun, chunk: int, tl: ScaleTimeline,
                  planner: PipelinePlanner | None) -> None:
        node = self.nodes[node_id]
        tl.mark_first_chunk(self.loop.now())
        self._count(m, "network", m.model.chunk_bytes[chunk])
        chunks = node.chunks.get(m.name)
        if chunks is None or node.timeline.get(m.name) is not tl:  # its instance is gone (a node that died: sim/faults.py)
            return
        chunks.add(chunk)
        self._touch(node)
        full = len(chunks) == m.model.n_chunks
        if full:  # its instance serves before the planner dissolves a pipeline: KV can ship to it
            self._node_full(node, m, pump=False)
        if planner is not None and tl.event_id in self._pipelines:
            p = planner.on_chunk(node_id, chunk)
            if p is not None:
                self._apply_pipelines(m, tl.event_id, p.form, p.dissolve)
        if full:
            self._pump(m)

    def _apply_pipelines(self, m: ModelRun, event_id: int, form: tuple[Pipeline, ...],
                         dissolve: tuple[Pipeline, ...]) -> None:
        _, tl, running, _ = self._pipelines[event_id]
        for p in dissolve:
            inst = running.pop(p, None)
            if inst is not None:
                self._dissolve(inst)
        planner = self._pipelines[event_id][0]
        for p in form:
            stages = tuple((s.node, s.start, s.end) for s in p.stages)
            inst = self._new_inst(m, InstanceState.PIPELINED, stages, pipeline=p)
            inst.helper_share = {n: k / m.model.n_blocks for n, k in p.loads().items() if n in planner.helpers}
            running[p] = inst
            tl.mark_first_pipeline(self.loop.now())
        if form:
            self._pump(m)

    def _settle_cut(self, inst: Inst, now: float) -> list[Req]:
        """An instance's segment cut at ``now`` (a dissolution, or its node stopping): what it
        computed so far counts, and the requests whose prefill was still in progress are returned
        (it is lost: they redo it elsewhere). Decode steps finished before the cut are credited; a
        pipeline's helpers finish the pass in progress (the runtime drains steps in flight), the
        rest never runs."""
        moved: list[Req] = []
        for r, first in zip(inst.seg_new, inst.seg_first):
            if inst.seg_start + first <= now:  # its micro-batch's prefill is done: the token was streamed
                if r.resume:
                    r.resume = False
                else:
                    r.first_token = inst.seg_start + first
                r.generated += 1
                if r.generated < r.out:
                    inst.running.append(r)
                else:
                    self._finish(inst, r, inst.seg_start + first)
            else:
                moved.append(r)
        if inst.seg_k > 1 and not inst.seg_new and inst.running:
            steps = min(inst.passes_done(now), inst.seg_k - 1)
            for r in inst.running:
                r.generated += steps
            self._refund(inst, inst.seg_k - min(steps + 1, inst.seg_k))
        return moved

    def _dissolve(self, inst: Inst) -> None:
        """Move a pipeline's requests, with their token state, back to the router."""
        self.loop.cancel(inst.event)
        inst.event = None
        moved = self._settle_cut(inst, self.loop.now())
        for r in inst.running:
            r.migrations += 1
            if not self._ship_kv(inst, r):
                r.resume = True
                moved.append(r)
        moved.extend(inst.pending)
        self.migrations += len(inst.running)
        inst.running, inst.pending, inst.seg_new, inst.seg_first = [], deque(), [], []
        self._drop_inst(inst)
        for r in reversed(moved):
            inst.m.held.appendleft(r)

    def _ship_kv(self, inst: Inst, r: Req) -> bool:
        """Ship ``r``'s KV cache from the dissolving pipeline ``inst`` to a full instance with a free
        slot (``pipe.serving.kv_destination``) when that beats recomputing it there
        (``pipe.serving.choose_kv_move``, the runtime's rule; ``sim.kv_move``). Each stage node sends its layers' share as a flow to the destination;
        the request joins the destination's next pass as a running sequence. False: recompute."""
        m = inst.m
        tokens = r.inp + r.generated
        fulls = [KvTarget(i.id, i.stages[0][0], i.outstanding, i.capacity - i.outstanding, i.kv_capacity - i.kv_used)
                 for i in m.insts.values() if i.state is InstanceState.FULL and len(i.stages) == 1]
        target = kv_destination(fulls, r.kv_tokens, inst.receivers)
        if target is None:
            return False
        dest = m.insts[target.id]
        move = choose_kv_move(tokens, tokens * m.kv_tok, m.net_Bps, m.cost.prefill_s(tokens),
                              self.s.kv_move, self.s.kv_ship_overhead_s)
        if move.choice is not KvMove.SHIP:
            return False
        dest.incoming += 1
        dest.kv_used += r.kv_tokens
        self._dirty(dest)
        self.kv_shipped += 1
        dn = dest.stages[0][0]
        assert inst.pipeline is not None  # only pipelines dissolve
        share = {n: k / m.model.n_blocks for n, k in inst.pipeline.loads().items() if n != dn}
        left = [len(share)]

        def landed(_: Flow | None = None) -> None:
            left[0] -= 1
            if left[0] <= 0:
                self._kv_landed(dest, r)

        if not share:  # every stage ran on the destination node: nothing crosses the network
            left[0] = 1
            self.loop.after(self.s.kv_ship_overhead_s, Priority.TRANSFER, landed)
        for n, sh in share.items():
            self.net.start((("out", n), ("in", dn)), move.kv_bytes * sh, landed,
                           latency_s=self.nic_latency + self.s.kv_ship_overhead_s, cap=m.net_Bps)
        return True

    def _kv_landed(self, dest: Inst, r: Req) -> None:
        dest.incoming -= 1
        self._dirty(dest)
        if self.insts.get(dest.id) is not dest or dest.state not in ROUTABLE:  # gone meanwhile: recompute
            dest.kv_used -= r.kv_tokens
            r.resume = True
            dest.m.held.appendleft(r)
            self._pump(dest.m)
            return
        r.kv_ready = True
        dest.pending.appendleft(r)
        if dest.event is None:  # once every cache landing at this instant is here: they start together
            self.loop.schedule(self.loop.now(), Priority.DISPATCH, self._start_idle, dest)
        else:
            self._cut_segment(dest)

    def _start_idle(self, inst: Inst) -> None:
        if inst.event is None and self.insts.get(inst.id) is inst:  # nothing started it meanwhile
            self._start_step(inst)

    def _node_full(self, node: NodeState, m: ModelRun, pump: bool = True) -> None:
        now = self.loop.now()
        inst = node.insts.get(m.name)
        if inst is None or inst.state is not InstanceState.LOADING:
            return
        inst.state = InstanceState.FULL
        self._dirty(inst)
        node.gpu_last_used[m.name] = now
        self._touch(node)
        tl = node.timeline.get(m.name)
        if tl is not None:
            tl.mark_first_pipeline(now)
            tl.mark_node_full(node.id, now)
            entry = self._pipelines.get(tl.event_id)
            if entry is not None and tl.complete:
                _, _, running, _ = entry
                for p in list(running):
                    self._dissolve(running.pop(p))
                del self._pipelines[tl.event_id]
                tl.mark_dissolved(now)
        if inst.remove_when_full:
            self._remove(inst.id)
        if pump:
            self._pump(m)

