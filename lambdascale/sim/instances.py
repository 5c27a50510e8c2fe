"""Instances and their steps: full instances and λPipe pipelines, batch execution, lending.

Batch execution is iteration-level continuous batching, fast-forwarded: while an instance's batch
does not change, its decode steps all last the same, so one event covers the ``k`` passes until
the first sequence finishes. A request routed to a busy instance joins at the next pass boundary
(the segment is cut there). A pass that admits new sequences prefills all their prompt tokens and
decodes one token for the running ones (prefill produces each new sequence's first token).

A λPipe pipeline serves as the runtime's does (:mod:`lambdascale.pipe.serving`): it takes as many
sequences as its widest stage's KV memory holds and runs each pass as one micro-batch per stage
(``sim.pipeline_microbatches``), micro-batch j entering after j others cleared the busiest node,
so its sequences get their tokens at staggered times and passes follow each other at the pace of
the slower of one micro-batch's latency and the busiest node's work. A full instance is the
one-micro-batch case. A source lending stages to a pipeline (``sim.pipeline_helper_blocks``)
pays for them with its own instance's time: a device does one thing at a time.
"""

from __future__ import annotations

from lambdascale.control.spec import InstanceState
from lambdascale.pipe.pipeline_types import Pipeline
from lambdascale.pipe.serving import microbatch_cap, microbatch_slots, pipeline_seqs_for, pipeline_step_tokens
from lambdascale.sim.events import Priority
from lambdascale.sim.state import Inst, ModelRun, NodeState, Req, prefill_tokens
from lambdascale.sim.views import Views


class Instances(Views):
    """Creating instances, running their steps, and the GPUs they hold."""

    def _new_inst(self, m: ModelRun, state: InstanceState, stages: tuple[tuple[int, int, int], ...],
                  pipeline: Pipeline | None = None) -> Inst:
        self._inst_seq += 1
        kind = "p" if pipeline is not None else "i"
        inst = Inst(f"{m.name}-{kind}{self._inst_seq}", state, stages, self.s.max_batch,
                    m.kv_capacity, m, pipeline=pipeline)
        if pipeline is not None and len(stages) > 1:
            hops = len(stages) - 1
            inst.comm_s_per_token = hops * m.act_bytes / m.net_Bps
            inst.comm_latency_s = hops * self.nic_latency
            # As the runtime's pipelines: one step in flight per stage, each over its own requests,
            # and a batch as large as the widest stage's KV memory holds (blocks stand for layers).
            B = m.model.n_blocks
            inst.slots = microbatch_slots(len(stages), self.s.pipeline_microbatches)
            inst.capacity = pipeline_seqs_for(self.s.max_batch, [(a, b) for _, a, b in stages], B,
                                              self.s.pipeline_batch)
            inst.kv_capacity = m.kv_capacity * inst.capacity // self.s.max_batch
            inst.bottleneck_share = max(pipeline.loads().values()) / B
        # the step budget grows with the extra sequences, as runtime.pipeline.pipeline_batch's
        inst.step_tokens = pipeline_step_tokens(self.s.max_prefill_tokens, self.s.max_batch, inst.capacity)
        self.insts[inst.id] = inst
        m.insts[inst.id] = inst
        m.version += 1
        return inst

    def _drop_inst(self, inst: Inst) -> None:
        """Forget an instance (drained, or a dissolved pipeline)."""
        self.insts.pop(inst.id, None)
        inst.m.insts.pop(inst.id, None)
        inst.m.version += 1

    @staticmethod
    def _serving(node: NodeState, m: ModelRun) -> bool:
        """The node runs a full instance of ``m`` (it may lend its device to pipeline stages)."""
        inst = node.insts.get(m.name)
        return inst is not None and inst.state is InstanceState.FULL

    def _own_inst(self, node: NodeState, m: ModelRun, state: InstanceState) -> Inst:
        """Give ``node``'s GPUs to a new instance of ``m`` (one per model and node)."""
        if m.name in node.insts:
            raise RuntimeError(f"node {node.id} already runs an instance of {m.name}")
        if node.gpus_free < m.model.tp:
            raise RuntimeError(f"node {node.id}: {m.name} needs {m.model.tp} GPUs, {node.gpus_free} free")
        node.gpus_free -= m.model.tp
        inst = self._new_inst(m, state, ((node.id, 0, m.model.n_blocks),))
        inst.gpu_since = self.loop.now()
        node.insts[m.name] = inst
        node.chunks[m.name] = set()
        self._touch(node)
        return inst

    def _free_gpu(self, node: NodeState, inst: Inst) -> None:
        now = self.loop.now()
        m = inst.m
        if inst.gpu_since is not None:
            self.gpu_seconds += (now - inst.gpu_since) * m.model.tp
        inst.gpu_since = None
        node.gpus_free += m.model.tp
        node.chunks.pop(m.name, None)
        node.insts.pop(m.name, None)
        node.timeline.pop(m.name, None)
        self._touch(node)

    # ---- batch execution --------------------------------------------------------------------

    def _comm(self, inst: Inst, tokens: int) -> float:
        return inst.comm_latency_s + tokens * inst.comm_s_per_token if inst.comm_s_per_token else 0.0

    def _start_step(self, inst: Inst) -> None:
        """Start the instance's next segment: a pass that prefills what fits (and decodes the
        running sequences), or ``k`` identical decode passes until the first sequence finishes.

        A pass of a λPipe pipeline runs as ``m`` micro-batches (``inst.slots``, at most one per
        sequence; split as the runtime's ``PipelineServer`` launches them: running sequences first,
        then new ones, each micro-batch ``pipe.serving.microbatch_cap`` of those left, so 5 over
        2 is 3 + 2), each through every stage in turn: micro-batch j enters after j others took the
        busiest node (its share of the blocks times a micro-batch's compute) and its sequences get
        their token a micro-batch's latency later. A pass ends when the last micro-batch has left;
        passes follow each other every ``max(latency, m x busiest node's time)``. A full instance
        is the case m = 1 (every pass lasts one step).
        """
        now = self.loop.now()
        new: list[Req] = []
        tokens = 0
        # every step in flight has its own budget, grown for a pipeline's extra sequences
        budget = inst.step_tokens * inst.slots
        while inst.pending and len(inst.running) + len(new) < inst.capacity:
            r = inst.pending[0]
            if r.kv_ready:  # its KV cache was shipped here (slot and KV reserved): it decodes on
                inst.pending.popleft()
                r.kv_ready = False
                inst.running.append(r)
                continue
            if inst.kv_used + r.kv_tokens > inst.kv_capacity and (inst.running or new):
                break
            if new and tokens + prefill_tokens(r) > budget:
                break  # step token budget (like vLLM's max_num_batched_tokens); the rest waits a step
            inst.pending.popleft()
            inst.kv_used += r.kv_tokens
            tokens += prefill_tokens(r)
            new.append(r)
        nrun = len(inst.running)
        if not new and not nrun:
            inst.event = None
            self._maybe_release(inst)
            return
        k = 1 if new else min(r.out - r.generated for r in inst.running)
        # micro-batches as the runtime's PipelineServer launches them into free slots: decodes
        # first, then prefills in admission order, each taking microbatch_cap of those left
        cuts = [0]
        while cuts[-1] < nrun + len(new):
            cuts.append(cuts[-1] + microbatch_cap(nrun + len(new) - cuts[-1], inst.slots - len(cuts) + 1))
        m = len(cuts) - 1
        lat: list[float] = []  # per micro-batch: compute through every stage plus the hops
        work = 0.0  # device time of one pass summed over micro-batches (the helpers lend a share of it)
        mb_new: list[list[Req]] = []  # each micro-batch's new sequences
        for j in range(m):
            n_run = max(0, min(cuts[j + 1], nrun) - cuts[j])
            mb_new.append(new[max(0, cuts[j] - nrun):max(0, cuts[j + 1] - nrun)])
            toks = sum(prefill_tokens(r) for r in mb_new[j])
            c = inst.m.cost.prefill_s(toks) + inst.m.cost.decode_s(n_run)
            work += c
            lat.append(c + self._comm(inst, toks + n_run))
        busiest = inst.bottleneck_share * max(lat)
        period = max(max(lat), m * busiest)
        ends = [j * busiest + lat[j] for j in range(m)]
        # a prefill pass starts every micro-batch afresh; decode passes continue staggered ones
        fill = max(ends) if new else period
        start = now
        if inst.helper_share:  # helpers' stages take their share of every step off the helpers' devices
            inst.lent_per_pass = {n: share * work for n, share in inst.helper_share.items()}
            for n, per in inst.lent_per_pass.items():
                self._lend(n, inst.m, per * k)
        elif self._lent_s and len(inst.stages) == 1:
            start += self._lent_s.pop((inst.stages[0][0], inst.m.name), 0.0)  # the node's own work waits for what it lent
        inst.seg_start, inst.seg_fill, inst.seg_period, inst.seg_k, inst.seg_new = start, fill, period, k, new
        inst.seg_first = [ends[j] for j in range(m) for _ in mb_new[j]]
        inst.event = self.loop.schedule(inst.seg_end(k), Priority.STEP, self._step_done, inst)

    def _lend(self, node: int, m: ModelRun, seconds: float) -> None:
        """``node``'s device runs pipeline stages for ``seconds`` (``sim.pipeline_helper_blocks``):
        its own instance's segment in progress ends that much later, as the runtime's device lends
        a running step's time to cross-node steps (``runtime.device``); an idle instance starts its
        next segment that much later. Negative ``seconds`` give back time charged for passes that
        did not run (never ending a segment before now)."""
        own = self.nodes[node].insts.get(m.name)
        if own is not None and own.event is not None and len(own.stages) == 1:
            shift = max(seconds, self.loop.now() - own.seg_end(own.seg_k))
            self.loop.cancel(own.event)
            own.seg_start += shift
            own.event = self.loop.schedule(own.seg_end(own.seg_k), Priority.STEP, self._step_done, own)
        else:
            self._lent_s[(node, m.name)] = max(0.0, self._lent_s.get((node, m.name), 0.0) + seconds)

    def _refund(self, inst: Inst, passes: int) -> None:
        """The pipeline's segment runs ``passes`` fewer passes than its helpers were charged for."""
        if passes > 0:
            for n, per in inst.lent_per_pass.items():
                self._lend(n, inst.m, -per * passes)

    def _cut_segment(self, inst: Inst) -> None:
        """New work arrived during a multi-step decode segment: end it at the next step boundary."""
        if inst.seg_new or inst.seg_k <= 1 or len(inst.running) >= inst.capacity:
            return
        done = inst.passes_done(self.loop.now()) + 1  # seg_start may lie ahead (lent time)
        if done < inst.seg_k:
            self.loop.cancel(inst.event)
            self._refund(inst, inst.seg_k - done)
            inst.seg_k = done
            inst.event = self.loop.schedule(inst.seg_end(done), Priority.STEP, self._step_done, inst)

    def _step_done(self, inst: Inst) -> None:
        now = self.loop.now()
        inst.event = None
        k = inst.seg_k
        for r in inst.running:
            r.generated += k
        for r, first in zip(inst.seg_new, inst.seg_first):
            if r.resume:
                r.resume = False
            else:
                r.first_token = inst.seg_start + first  # its micro-batch left the last stage then
            r.generated += 1
            inst.running.append(r)
        inst.seg_new, inst.seg_first = [], []
        still: list[Req] = []
        for r in inst.running:
            if r.generated >= r.out:
                self._finish(inst, r, now)
            else:
                still.append(r)
        freed = len(still) < len(inst.running)
        inst.running = still
        name = inst.m.name
        for n in inst.nodes:
            node = self.nodes[n]
            if now - node.gpu_last_used.get(name, -1e18) >= 1.0:  # LRU key at 1 s resolution keeps node views cached
                node.gpu_last_used[name] = now
                self._touch(node)
        self._dirty(inst)
        self._start_step(inst)
        if freed or (inst.m.held and self.cfg.router_late_binding):
            self._pump(inst.m)

    def _finish(self, inst: Inst, r: Req, at: float) -> None:
        r.finish = at
        inst.kv_used -= r.kv_tokens
        self.done += 1
        m = inst.m
        m.svc_ewma = 0.9 * m.svc_ewma + 0.1 * (at - r.arrival) if m.svc_ewma else at - r.arrival

    def _maybe_release(self, inst: Inst) -> None:
        """Free a drained instance's GPUs, unless its copy still feeds a multicast (then the
        multicast's end calls this again)."""
        if inst.state is InstanceState.DRAINING and inst.outstanding == 0 and inst.event is None:
            self._drop_inst(inst)
            node = self.nodes[inst.stages[0][0]]
            if node.insts.get(inst.m.name) is inst and node.source_busy.get(inst.m.name, 0) == 0:
                self._free_gpu(node, inst)
