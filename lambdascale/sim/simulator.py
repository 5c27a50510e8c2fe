"""The cluster simulator: one system, one workload, one cluster, on simulated time.

Data flow per event (see the module map in docs/arch/sim.md)::

    arrival ──> gateway queue ──> control.router.dispatch (late binding) ──> instance ──> batch steps
    control tick ──> snapshot ──> control.autoscale ──> control.place ──> load / multicast
                                                   └──> control.manage_memory ──> evict / copy back
    multicast (pipe.plan_multicast) ──> rounds of flows on the Network ──> chunk lands
        ──> pipe.PipelinePlanner.on_chunk ──> form / dissolve λPipe pipelines ──> node full

The simulator owns *mechanism* only (moving bytes, running batches, bookkeeping); every decision
comes from the shared policies in ``lambdascale.control`` and ``lambdascale.pipe``.

The gateway binds late (``sim.late_binding``): requests wait in its FIFO until an instance or
pipeline can start them in its next step, so capacity that appears later drains the backlog; an
arrival that finds no instance runs a controller pass at once (``sim.kick_from_zero``). Requests
arriving at one instant are dispatched together, after the last of them, so a burst starts as one
batch.

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
one-micro-batch case.
Requests on a pipeline that is dissolved move, with their token state, to a full instance: their
KV cache ships there over the network when that is cheaper than recomputing it (the runtime's
rule, ``sim.kv_move``), else the instance the router picks recomputes it (a prefill of prompt +
generated tokens); either way the stream continues and TTFT is unchanged, as the client saw its
first token already (a micro-batch whose prefill ended before the dissolution keeps its first
token; one still in progress is prefilled again).

Costs: GPU-seconds = GPUs held by instances (from the moment a node is picked as a target, so
loading counts) integrated over time, until the simulation ends.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import numpy as np

from lambdascale.control.autoscaler import autoscale
from lambdascale.control.memory import manage_memory
from lambdascale.control.placement import place
from lambdascale.control.router import QueuedRequest, Waiting, dispatch
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import (
    ClusterSnapshot,
    CopyBack,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    ModelView,
    NodeView,
    ScalePlan,
    Stage,
    Tier,
)
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.pipe.multicast import MulticastPlan, plan_multicast
from lambdascale.pipe.pipelines import Pipeline, PipelinePlanner
from lambdascale.pipe.serving import KvMove, choose_kv_move, microbatch_slots, pipeline_seqs
from lambdascale.sim.cluster import ClusterSpec, SimModel
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.events import EventHandle, EventLoop, Priority
from lambdascale.sim.network import Flow, Network
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.systems.base import System
from lambdascale.sim.workload import Workload

_ROUTABLE = (InstanceState.FULL, InstanceState.PIPELINED)
GB = 1e9
GIB = float(1 << 30)


def _prefill_tokens(r: "Req") -> int:
    """Tokens the request's first step on an instance prefills (a resumed request recomputes its
    generated tokens too; one whose KV cache was shipped there prefills nothing)."""
    if r.kv_ready:
        return 0
    return r.inp + (r.generated if r.resume else 0)


# ---- state -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Req:
    """One request's token state and timestamps (NaN until they happen)."""

    idx: int
    arrival: float
    inp: int
    out: int
    generated: int = 0
    first_token: float = math.nan
    finish: float = math.nan
    migrations: int = 0
    resume: bool = False  # migrated: next prefill recomputes prompt + generated tokens
    kv_ready: bool = False  # migrated with its KV cache shipped to its instance: it decodes on, no prefill

    @property
    def kv_tokens(self) -> int:
        return self.inp + self.out


@dataclass(eq=False)
class Inst:
    """A full instance on one node, or a λPipe pipeline over several loading nodes."""

    id: str
    state: InstanceState
    stages: tuple[tuple[int, int, int], ...]  # (node, block_start, block_end)
    capacity: int
    kv_capacity: int
    pipeline: Pipeline | None = None
    comm_s_per_token: float = 0.0
    comm_latency_s: float = 0.0
    running: list[Req] = field(default_factory=list)
    pending: deque[Req] = field(default_factory=deque)
    kv_used: int = 0
    incoming: int = 0  # requests whose KV cache is being shipped here (slot and KV reserved)
    # λPipe micro-batching: steps in flight at once, and the busiest node's share of the blocks
    slots: int = 1
    bottleneck_share: float = 1.0
    # current segment of seg_k passes (every sequence advances one token per pass): pass i ends at
    # seg_start + seg_fill + (i - 1) * seg_period; seg_new are prefilled in its first pass, seg_first
    # their first tokens' offsets from seg_start
    seg_start: float = 0.0
    seg_fill: float = 0.0
    seg_period: float = 0.0
    seg_k: int = 0
    seg_new: list[Req] = field(default_factory=list)
    seg_first: list[float] = field(default_factory=list)
    event: EventHandle | None = None
    remove_when_full: bool = False
    helper_share: dict[int, float] = field(default_factory=dict)  # helper node -> share of the blocks it runs
    lent_per_pass: dict[int, float] = field(default_factory=dict)  # helper node -> device time one pass takes from it

    view: InstanceView | None = None  # cached contract view; None after any change

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.pending) + len(self.seg_new) + self.incoming

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(s[0] for s in self.stages)

    def seg_end(self, passes: int) -> float:
        """When the segment's first ``passes`` passes have ended."""
        return self.seg_start + self.seg_fill + (passes - 1) * self.seg_period

    def passes_done(self, now: float) -> int:
        """Passes of the current segment that ended by ``now``."""
        t = now - self.seg_start - self.seg_fill
        if t < 0:
            return 0
        return min(self.seg_k, int(t / self.seg_period) + 1 if self.seg_period > 0 else self.seg_k)


@dataclass(eq=False)
class NodeState:
    """What a node holds and which GPU instance it runs."""

    id: int
    gpus_total: int
    gpus_free: int
    host: bool = False
    host_partial: bool = False
    host_last_used: float = 0.0
    ssd: bool = False
    ssd_partial: bool = False
    chunks: set[int] = field(default_factory=set)  # chunks on GPU (loading or full)
    inst: Inst | None = None  # the node's own (loading or full) instance
    gpu_since: float | None = None
    gpu_last_used: float = 0.0
    timeline: ScaleTimeline | None = None
    source_busy: int = 0  # multicasts using this node's copy right now
    view: NodeView | None = None  # cached contract view and the state it was built from
    view_key: tuple[Any, ...] = ()


@dataclass
class ScaleRecord:
    """One executed scale-out plan with its milestones."""

    timeline: ScaleTimeline
    n_targets: int
    n_network: int
    n_sources: int
    algo: str
    tiers: dict[str, int]


@dataclass
class SimResult:
    """Everything a report needs from one run (arrays indexed like the workload)."""

    system: str
    ttft: np.ndarray
    tpot: np.ndarray
    finish: np.ndarray
    gpu_seconds: float
    end_time: float
    scale_events: list[ScaleRecord]
    series_t: np.ndarray
    series_instances: np.ndarray
    series_pipelines: np.ndarray
    series_rate: np.ndarray
    migrations: int
    events: int
    unfinished: int
    kv_shipped: int = 0  # migrations whose KV cache was shipped (the others recomputed it)

    def slo_attainment(self, slo_s: float) -> float:
        ok = np.sum(np.nan_to_num(self.ttft, nan=np.inf) <= slo_s)
        return float(ok / max(1, len(self.ttft)))


# ---- the simulator -----------------------------------------------------------------------------


class Simulation:
    """Replays ``workload`` against ``system`` on a cluster of ``settings.nodes`` nodes.

    Everything random was drawn when the workload was generated; the run itself is
    deterministic. All state is per instance (no globals), so simulations can run side by side.
    """

    def __init__(self, workload: Workload, cluster: ClusterSpec, model: SimModel, system: System,
                 settings: SimSettings, control: ControlSettings, cost: CostModel,
                 progress: Callable[[float], None] | None = None) -> None:
        self.w, self.cluster, self.model, self.system, self.s = workload, cluster, model, system, settings
        self.cfg = system.control_settings(control, settings.baseline_sources)
        if settings.late_binding:  # the gateway's dispatch mode applies to every system alike
            self.cfg = ControlSettings.model_validate({
                **self.cfg.model_dump(), "router_late_binding": True,
                "router_max_waiting_tokens": settings.max_prefill_tokens})
        self.cost = cost
        self.progress = progress
        self.loop = EventLoop()
        ka = settings.keep_alive_s if system.keep_alive_s is None else (
            settings.keepalive_baseline_keep_alive_s if system.keep_alive_s < 0 else system.keep_alive_s)
        self.spec = DeploymentSpec(
            min_instances=min(settings.min_instances, settings.nodes), max_instances=settings.nodes,
            target_concurrency=settings.target_concurrency, keep_alive_s=ka,
            cache_tiers=system.cache_tiers, scale_to_zero=settings.min_instances == 0,
            gpus_per_instance=model.tp)
        # One instance of the model per node (the simulator's unit); extra GPUs on a node stay idle.
        self.gpus_per_node = max(settings.gpus_per_node or cluster.gpus_per_node, model.tp)
        L = cluster.links
        tp = model.tp
        self.nic_Bps = L.nic_gbps / 8 * GB * tp  # an instance drives one NIC per GPU
        self.nic_latency = L.nic_latency_us * 1e-6
        self.net = Network(self.loop)
        for n in range(settings.nodes):
            self.net.add_link(("out", n), self.nic_Bps)
            self.net.add_link(("in", n), self.nic_Bps)
            # Host memory -> GPUs of one instance: one figure per node (the λScale testbed loads a
            # 4-GPU 70B from host memory at ~54 GB/s in total, 2.55 s), not one per GPU.
            self.net.add_link(("pcie", n), L.pcie_GBps * GB)
            self.net.add_link(("d2h", n), L.pcie_GBps * GB)
            self.net.add_link(("ssd", n), L.ssd_GBps * GB)
            self.net.add_link(("ssdw", n), L.ssd_GBps * GB)
        host_pool = cluster.host_memory_gib if settings.host_pool_gib is None else settings.host_pool_gib
        # Per-node pool for this model's host copies; nodes past ``host_cache_nodes`` have their
        # pools full of other tenants' models (multi-tenant pressure), so they cache nothing.
        hc = settings.nodes if settings.host_cache_nodes is None else settings.host_cache_nodes
        self.host_total = [int(host_pool * GIB) if n < hc else 0 for n in range(settings.nodes)]
        self.ssd_bytes_total = int(max(4 * 2**40, 2 * model.nbytes))
        self.nodes = [NodeState(n, self.gpus_per_node, self.gpus_per_node, ssd=settings.ssd_preloaded)
                      for n in range(settings.nodes)]
        # KV capacity of one instance, in tokens (prompt + output of admitted sequences).
        kv_tok = model.arch.kv_bytes_per_token()
        spare = tp * cluster.gpu.memory_gib * GIB - model.nbytes
        self.kv_capacity = max(1, int(spare * settings.kv_memory_fraction / kv_tok))
        self.kv_tok = kv_tok
        self.act_bytes = model.arch.activation_bytes_per_token()
        self.reqs = [Req(i, float(a), int(x), int(y)) for i, (a, x, y) in
                     enumerate(zip(workload.arrival_s, workload.input_tokens, workload.output_tokens))]
        self.held: deque[Req] = deque()
        self._dispatch: EventHandle | None = None  # the pending dispatch of this instant's arrivals
        self.insts: dict[str, Inst] = {}
        self._inst_seq = 0
        self._event_seq = 0
        self.scale_events: list[ScaleRecord] = []
        self.last_request_at: float | None = None
        self.last_scale_at: float | None = None
        self._recent: deque[float] = deque()
        self._svc_ewma = 0.0
        self.done = 0
        self.arrived = 0
        self.rejected = 0
        self.migrations = 0
        self.kv_shipped = 0
        self.gpu_seconds = 0.0
        self._copying: set[tuple[int, Tier]] = set()
        self._pipelines: dict[int, tuple[PipelinePlanner, ScaleTimeline, dict[Pipeline, Inst], set[int]]] = {}
        # device time a node lent to pipeline stages (sim.pipeline_helper_blocks), not yet taken out
        # of its own instance's steps: a device does one thing at a time
        self._lent_s: dict[int, float] = {}
        self.series: list[tuple[float, int, int, int]] = []
        self._arrivals_in_sample = 0
        self._finished = False
        self._next_memory = 0.0

    # ---- helpers ----------------------------------------------------------------------------

    def _new_inst(self, state: InstanceState, stages: tuple[tuple[int, int, int], ...],
                  pipeline: Pipeline | None = None) -> Inst:
        self._inst_seq += 1
        kind = "p" if pipeline is not None else "i"
        inst = Inst(f"{self.model.name}-{kind}{self._inst_seq}", state, stages, self.s.max_batch,
                    self.kv_capacity, pipeline=pipeline)
        if pipeline is not None and len(stages) > 1:
            hops = len(stages) - 1
            inst.comm_s_per_token = hops * self.act_bytes / self.nic_Bps
            inst.comm_latency_s = hops * self.nic_latency
            # As the runtime's pipelines: one step in flight per stage, each over its own requests,
            # and a batch as large as the widest stage's KV memory holds (blocks stand for layers).
            B = self.model.n_blocks
            inst.slots = microbatch_slots(len(stages), self.s.pipeline_microbatches)
            widest = max(b - a for _, a, b in stages)
            inst.capacity = pipeline_seqs(self.s.max_batch, B, widest, len(stages), self.s.pipeline_batch)
            inst.kv_capacity = self.kv_capacity * inst.capacity // self.s.max_batch
            inst.bottleneck_share = max(pipeline.loads().values()) / B
        self.insts[inst.id] = inst
        return inst

    @staticmethod
    def _serving(node: NodeState) -> bool:
        """The node runs a full instance of the model (it may lend its device to pipeline stages)."""
        return node.inst is not None and node.inst.state is InstanceState.FULL

    def _alloc_gpu(self, node: NodeState) -> None:
        node.gpus_free -= self.model.tp
        node.gpu_since = self.loop.now()

    def _free_gpu(self, node: NodeState) -> None:
        now = self.loop.now()
        if node.gpu_since is not None:
            self.gpu_seconds += (now - node.gpu_since) * self.model.tp
        node.gpu_since = None
        node.gpus_free += self.model.tp
        node.chunks.clear()
        node.inst = None

    # ---- snapshot ---------------------------------------------------------------------------

    def _inst_view(self, inst: Inst) -> InstanceView:
        """The instance's contract view, rebuilt only after it changed (``inst.view = None``)."""
        if inst.view is None:
            toks = (sum(r.inp + r.out - r.generated for r in inst.pending)
                    + sum(r.inp + r.out - r.generated for r in inst.seg_new)
                    + sum(r.out - r.generated for r in inst.running))
            inst.view = InstanceView(inst.id, self.model.name, inst.state,
                                     tuple(Stage(n, a, b) for n, a, b in inst.stages),
                                     capacity=inst.capacity, outstanding_requests=inst.outstanding,
                                     outstanding_tokens=toks, step_slots=inst.slots)
        return inst.view

    def _model_view(self) -> ModelView:
        now = self.loop.now()
        while self._recent and self._recent[0] < now - self.s.rate_window_s:
            self._recent.popleft()
        insts = tuple(self._inst_view(i) for i in self.insts.values())
        return ModelView(
            name=self.model.name, spec=self.spec, size_bytes=self.model.nbytes, n_blocks=self.model.n_blocks,
            instances=insts, queue_len=len(self.held),
            in_flight=sum(i.outstanding for i in self.insts.values()),
            arrival_rate=len(self._recent) / self.s.rate_window_s, service_time_s=self._svc_ewma,
            last_request_at=self.last_request_at, last_scale_at=self.last_scale_at)

    def _holdings(self, node: NodeState) -> tuple[Holding, ...]:
        m, nb, K = self.model.name, self.model.nbytes, self.model.n_chunks
        out: list[Holding] = []
        if node.inst is not None:
            if len(node.chunks) == K:
                out.append(Holding(m, Tier.GPU, nb, node.gpu_last_used, pinned=node.source_busy > 0))
            else:
                held = int(sum(self.model.chunk_bytes[c] for c in node.chunks))
                out.append(Holding(m, Tier.GPU, held, node.gpu_last_used, blocks=self.model.blocks_held(node.chunks)))
        if node.host:
            out.append(Holding(m, Tier.HOST, nb, node.host_last_used, pinned=node.source_busy > 0))
        elif node.host_partial:
            out.append(Holding(m, Tier.HOST, nb, node.host_last_used, blocks=frozenset()))
        if node.ssd or node.ssd_partial:
            out.append(Holding(m, Tier.SSD, nb, 0.0, blocks=None if node.ssd else frozenset()))
        return tuple(out)

    def _node_key(self, n: NodeState) -> tuple[Any, ...]:
        st = None if n.inst is None else n.inst.state
        return (st, len(n.chunks), n.host, n.host_partial, n.ssd, n.ssd_partial, n.source_busy > 0,
                n.gpus_free, n.host_last_used, n.gpu_last_used)

    def snapshot(self) -> ClusterSnapshot:
        nodes = []
        for n in self.nodes:
            key = self._node_key(n)
            if n.view is not None and n.view_key == key:
                nodes.append(n.view)
                continue
            hs = self._holdings(n)
            host_used = sum(h.nbytes for h in hs if h.tier is Tier.HOST)
            ssd_used = sum(h.nbytes for h in hs if h.tier is Tier.SSD)
            nodes.append(NodeView(
                id=n.id, gpus_total=n.gpus_total, gpus_free=0 if n.inst is not None else n.gpus_free,
                host_bytes_total=self.host_total[n.id], host_bytes_free=max(0, self.host_total[n.id] - host_used),
                ssd_bytes_total=self.ssd_bytes_total, ssd_bytes_free=max(0, self.ssd_bytes_total - ssd_used),
                holdings=hs))
            n.view, n.view_key = nodes[-1], key
        return ClusterSnapshot(nodes=tuple(nodes), models=(self._model_view(),))

    # ---- requests ---------------------------------------------------------------------------

    def _arrive(self, r: Req) -> None:
        now = self.loop.now()
        self.arrived += 1
        self._arrivals_in_sample += 1
        self.last_request_at = now
        self._recent.append(now)
        self.held.append(r)
        if self.s.kick_from_zero and not any(i.state is not InstanceState.DRAINING for i in self.insts.values()):
            # The gateway runs an out-of-band controller pass when a request finds no instance at
            # all (scale from zero), as the real gateway does, instead of waiting for the next tick.
            self._control_pass()
        if self._dispatch is None:  # once every request of this instant is queued: a burst starts as one batch
            self._dispatch = self.loop.schedule(now, Priority.DISPATCH, self._dispatch_arrivals)

    def _dispatch_arrivals(self) -> None:
        self._dispatch = None
        self._pump()

    def _pump(self) -> None:
        """Dispatch held requests in arrival order (``control.router.dispatch``) until none fits.

        With late binding (``sim.late_binding``, every system) an instance takes a request only
        when it can start it at its next step, so a backlog waits here and drains onto whichever
        instance or pipeline frees up or appears first; with early binding any free slot binds it.
        """
        if not self.held:
            return
        late = self.cfg.router_late_binding
        budget = self.cfg.router_max_waiting_tokens
        free = 0
        waiting: dict[str, Waiting] = {}
        ready = False
        for i in self.insts.values():
            if i.state not in _ROUTABLE or i.outstanding >= i.capacity:
                continue
            free += i.capacity - i.outstanding
            if i.pending:
                w = Waiting(len(i.pending), sum(_prefill_tokens(r) for r in i.pending))
                waiting[i.id] = w
                ready = ready or not late or w.prompt_tokens < budget * i.slots
            else:
                ready = True
        # A pure shortcut: when no instance could take even a one-token request, dispatch would
        # assign nothing, so skip building the views.
        if not ready:
            return
        n = min(len(self.held), free)
        queue = [QueuedRequest(str(r.idx), _prefill_tokens(r), r.inp + r.out - r.generated)
                 for r in itertools.islice(self.held, n)]
        res = dispatch(queue, self._model_view(), self.cfg, self.loop.now(), waiting)
        touched: dict[str, Inst] = {}
        for a in res.assignments:
            r = self.held.popleft()  # assignments are a prefix of the queue, in order
            assert str(r.idx) == a.request_id
            inst = self.insts[a.instance_id]
            inst.pending.append(r)
            inst.view = None
            touched[inst.id] = inst
        for inst in touched.values():  # a burst to an idle instance prefills together
            if inst.event is None:
                self._start_step(inst)
            else:
                self._cut_segment(inst)

    def _admit(self, inst: Inst, r: Req) -> None:
        inst.pending.append(r)
        inst.view = None
        if inst.event is None:
            self._start_step(inst)
        else:
            self._cut_segment(inst)

    # ---- batch execution --------------------------------------------------------------------

    def _comm(self, inst: Inst, tokens: int) -> float:
        return inst.comm_latency_s + tokens * inst.comm_s_per_token if inst.comm_s_per_token else 0.0

    def _start_step(self, inst: Inst) -> None:
        """Start the instance's next segment: a pass that prefills what fits (and decodes the
        running sequences), or ``k`` identical decode passes until the first sequence finishes.

        A pass of a λPipe pipeline runs as ``m`` micro-batches (``inst.slots``, at most one per
        sequence), each through every stage in turn: micro-batch j enters after j others took the
        busiest node (its share of the blocks times a micro-batch's compute) and its sequences get
        their token a micro-batch's latency later. A pass ends when the last micro-batch has left;
        passes follow each other every ``max(latency, m x busiest node's time)``. A full instance
        is the case m = 1 (every pass lasts one step).
        """
        now = self.loop.now()
        new: list[Req] = []
        tokens = 0
        budget = self.s.max_prefill_tokens * inst.slots  # every step in flight has its own budget
        while inst.pending and len(inst.running) + len(new) < inst.capacity:
            r = inst.pending[0]
            if r.kv_ready:  # its KV cache was shipped here (slot and KV reserved): it decodes on
                inst.pending.popleft()
                r.kv_ready = False
                inst.running.append(r)
                continue
            if inst.kv_used + r.kv_tokens > inst.kv_capacity and (inst.running or new):
                break
            if new and tokens + _prefill_tokens(r) > budget:
                break  # step token budget (like vLLM's max_num_batched_tokens); the rest waits a step
            inst.pending.popleft()
            inst.kv_used += r.kv_tokens
            tokens += _prefill_tokens(r)
            new.append(r)
        nrun = len(inst.running)
        if not new and not nrun:
            inst.event = None
            self._maybe_release(inst)
            return
        k = 1 if new else min(r.out - r.generated for r in inst.running)
        m = min(inst.slots, nrun + len(new))
        lat: list[float] = []  # per micro-batch: compute through every stage plus the hops
        work = 0.0  # device time of one pass summed over micro-batches (the helpers lend a share of it)
        cuts = [j * len(new) // m for j in range(m + 1)]
        for j in range(m):
            toks = sum(_prefill_tokens(r) for r in new[cuts[j]:cuts[j + 1]])
            n_run = nrun // m + (1 if j < nrun % m else 0)
            c = self.cost.prefill_s(toks) + self.cost.decode_s(n_run)
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
                self._lend(n, per * k)
        elif self._lent_s and len(inst.stages) == 1:
            start += self._lent_s.pop(inst.stages[0][0], 0.0)  # the node's own work waits for what it lent
        inst.seg_start, inst.seg_fill, inst.seg_period, inst.seg_k, inst.seg_new = start, fill, period, k, new
        inst.seg_first = [ends[j] for j in range(m) for _ in range(cuts[j], cuts[j + 1])]
        inst.event = self.loop.schedule(inst.seg_end(k), Priority.STEP, self._step_done, inst)

    def _lend(self, node: int, seconds: float) -> None:
        """``node``'s device runs pipeline stages for ``seconds`` (``sim.pipeline_helper_blocks``):
        its own instance's segment in progress ends that much later, as the runtime's device lends
        a running step's time to cross-node steps (``runtime.device``); an idle instance starts its
        next segment that much later. Negative ``seconds`` give back time charged for passes that
        did not run (never ending a segment before now)."""
        own = self.nodes[node].inst
        if own is not None and own.event is not None and len(own.stages) == 1:
            shift = max(seconds, self.loop.now() - own.seg_end(own.seg_k))
            self.loop.cancel(own.event)
            own.seg_start += shift
            own.event = self.loop.schedule(own.seg_end(own.seg_k), Priority.STEP, self._step_done, own)
        else:
            self._lent_s[node] = max(0.0, self._lent_s.get(node, 0.0) + seconds)

    def _refund(self, inst: Inst, passes: int) -> None:
        """The pipeline's segment runs ``passes`` fewer passes than its helpers were charged for."""
        if passes > 0:
            for n, per in inst.lent_per_pass.items():
                self._lend(n, -per * passes)

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
        for n in inst.nodes:
            node = self.nodes[n]
            if now - node.gpu_last_used >= 1.0:  # LRU key at 1 s resolution keeps node views cached
                node.gpu_last_used = now
        inst.view = None
        self._start_step(inst)
        if freed or (self.held and self.cfg.router_late_binding):
            self._pump()

    def _finish(self, inst: Inst, r: Req, at: float) -> None:
        r.finish = at
        inst.kv_used -= r.kv_tokens
        self.done += 1
        self._svc_ewma = 0.9 * self._svc_ewma + 0.1 * (at - r.arrival) if self._svc_ewma else at - r.arrival

    def _maybe_release(self, inst: Inst) -> None:
        """Free a drained instance's GPUs, unless its copy still feeds a multicast (then the
        multicast's end calls this again)."""
        if inst.state is InstanceState.DRAINING and inst.outstanding == 0 and inst.event is None:
            self.insts.pop(inst.id, None)
            node = self.nodes[inst.stages[0][0]]
            if node.inst is inst and node.source_busy == 0:
                self._free_gpu(node)

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

    # ---- scale-out --------------------------------------------------------------------------

    def _execute(self, plan: ScalePlan) -> ScaleRecord:
        """Start every load of a placement plan: local tiers, multicast, or the model store."""
        now = self.loop.now()
        self._event_seq += 1
        targets = tuple(t.node for t in plan.targets)
        tl = ScaleTimeline(self._event_seq, self.model.name, now, targets)
        tiers: dict[str, int] = {}
        for t in plan.targets:
            tiers[t.local_tier.value] = tiers.get(t.local_tier.value, 0) + 1
        network = list(plan.network_targets)
        use_peers = bool(plan.sources) and bool(network) and self.system.peer_fetch
        rec = ScaleRecord(tl, len(targets), len(network) if use_peers else 0,
                          len(plan.sources) if use_peers else 0, plan.algo.value if use_peers else "local", tiers)
        self.scale_events.append(rec)
        for t in plan.targets:
            node = self.nodes[t.node]
            self._alloc_gpu(node)
            node.inst = self._new_inst(InstanceState.LOADING, ((t.node, 0, self.model.n_blocks),))
            node.timeline = tl
        for t in plan.local_targets:
            self._local_load(self.nodes[t.node], t.local_tier)
        if network and not use_peers:
            for n in network:  # no peer fetch: the node's SSD copy, else the model store (SSD-speed)
                self._local_load(self.nodes[n], Tier.SSD)
        elif network:
            self._multicast(plan, tl)
        return rec

    def _local_load(self, node: NodeState, tier: Tier) -> None:
        if tier is Tier.GPU:
            node.chunks = set(range(self.model.n_chunks))
            self.loop.after(0.0, Priority.STATE, self._node_full, node)
            return
        path: tuple[Any, ...] = (("pcie", node.id),) if tier is Tier.HOST else (("ssd", node.id), ("pcie", node.id))
        if tier is Tier.HOST:
            node.host_last_used = self.loop.now()

        def done(_: Flow) -> None:
            node.chunks = set(range(self.model.n_chunks))
            if (tier is Tier.SSD and Tier.HOST in self.spec.cache_tiers and self.cfg.memory_copy_back
                    and self.host_total[node.id] >= self.model.nbytes):
                # The loader stages SSD reads in pinned host memory: the copy stays cached there
                # if the pool has room (the memory manager evicts it otherwise).
                node.host, node.host_last_used = True, self.loop.now()
            self._node_full(node)

        self.net.start(path, self.model.nbytes, done, latency_s=0.0)

    def _multicast(self, plan: ScalePlan, tl: ScaleTimeline) -> None:
        order = plan.multicast_nodes()
        mc = plan_multicast(plan.algo.value, len(order), len(plan.sources), self.model.n_blocks, self.model.n_chunks,
                            layout=self.model.layout)
        receivers = [order[i] for i in mc.receiver_nodes]
        for s in plan.sources:
            self.nodes[s.node].source_busy += 1
            if s.tier is Tier.HOST:
                self.nodes[s.node].host_last_used = self.loop.now()
        planner = None
        if self.system.execute_while_load and plan.execute_while_load:
            lend = self.s.pipeline_helper_blocks  # sources serving the model may run stages
            helpers = {s.node: lend for s in plan.sources if lend and self._serving(self.nodes[s.node])}
            planner = PipelinePlanner(receivers, self.model.n_blocks, self.model.n_chunks, layout=self.model.layout,
                                      helpers=helpers or None)
            self._pipelines[tl.event_id] = (planner, tl, {}, set(receivers))
        srcs = [s.node for s in plan.sources]
        if self.s.multicast_mode == "chunk":
            _ChunkMulticastRun(self, mc, order, tl, planner, srcs).start()
        else:
            _MulticastRun(self, mc, order, tl, planner, srcs).start_round()

    def _on_chunk(self, node_id: int, chunk: int, tl: ScaleTimeline, planner: PipelinePlanner | None) -> None:
        node = self.nodes[node_id]
        tl.mark_first_chunk(self.loop.now())
        if node.inst is None:
            return
        node.chunks.add(chunk)
        full = len(node.chunks) == self.model.n_chunks
        if full:  # its instance serves before the planner dissolves a pipeline: KV can ship to it
            self._node_full(node, pump=False)
        if planner is not None and tl.event_id in self._pipelines:
            p = planner.on_chunk(node_id, chunk)
            if p is not None:
                self._apply_pipelines(tl.event_id, p.form, p.dissolve)
        if full:
            self._pump()

    def _apply_pipelines(self, event_id: int, form: tuple[Pipeline, ...], dissolve: tuple[Pipeline, ...]) -> None:
        _, tl, running, _ = self._pipelines[event_id]
        for p in dissolve:
            inst = running.pop(p, None)
            if inst is not None:
                self._dissolve(inst)
        planner = self._pipelines[event_id][0]
        for p in form:
            stages = tuple((s.node, s.start, s.end) for s in p.stages)
            inst = self._new_inst(InstanceState.PIPELINED, stages, pipeline=p)
            inst.helper_share = {n: k / self.model.n_blocks for n, k in p.loads().items() if n in planner.helpers}
            running[p] = inst
            tl.mark_first_pipeline(self.loop.now())
        if form:
            self._pump()

    def _dissolve(self, inst: Inst) -> None:
        """Move a pipeline's requests, with their token state, back to the router."""
        self.loop.cancel(inst.event)
        inst.event = None
        moved: list[Req] = []
        now = self.loop.now()
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
                moved.append(r)  # a prefill in progress is lost: redo it elsewhere
        if inst.seg_k > 1 and not inst.seg_new and inst.running:
            # Credit the decode steps finished before the cut.
            steps = inst.passes_done(now)
            for r in inst.running:
                r.generated += min(steps, inst.seg_k - 1)
            # the helpers finish the pass in progress (the runtime drains steps in flight); the rest never runs
            self._refund(inst, inst.seg_k - min(steps + 1, inst.seg_k))
        for r in inst.running:
            r.migrations += 1
            if not self._ship_kv(inst, r):
                r.resume = True
                moved.append(r)
        moved.extend(inst.pending)
        self.migrations += len(inst.running)
        inst.running, inst.pending, inst.seg_new, inst.seg_first = [], deque(), [], []
        self.insts.pop(inst.id, None)
        for r in reversed(moved):
            self.held.appendleft(r)

    def _ship_kv(self, inst: Inst, r: Req) -> bool:
        """Ship ``r``'s KV cache from the dissolving pipeline ``inst`` to a full instance with a free
        slot when that beats recomputing it there (``pipe.serving.choose_kv_move``, the runtime's
        rule; ``sim.kv_move``). Each stage node sends its layers' share as a flow to the destination;
        the request joins the destination's next pass as a running sequence. False: recompute."""
        tokens = r.inp + r.generated
        fits = [i for i in self.insts.values() if i.state is InstanceState.FULL and len(i.stages) == 1
                and i.outstanding < i.capacity and i.kv_used + r.kv_tokens <= i.kv_capacity]
        if not fits:
            return False
        members = set(inst.nodes) - set(inst.helper_share)
        dest = min(fits, key=lambda i: (i.stages[0][0] not in members, i.outstanding, i.id))  # the gateway keeps slots there
        move = choose_kv_move(tokens, tokens * self.kv_tok, self.nic_Bps, self.cost.prefill_s(tokens),
                              self.s.kv_move, self.s.kv_ship_overhead_s)
        if move.choice is not KvMove.SHIP:
            return False
        dest.incoming += 1
        dest.kv_used += r.kv_tokens
        dest.view = None
        self.kv_shipped += 1
        dn = dest.stages[0][0]
        assert inst.pipeline is not None  # only pipelines dissolve
        share = {n: k / self.model.n_blocks for n, k in inst.pipeline.loads().items() if n != dn}
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
                           latency_s=self.nic_latency + self.s.kv_ship_overhead_s)
        return True

    def _kv_landed(self, dest: Inst, r: Req) -> None:
        dest.incoming -= 1
        dest.view = None
        if self.insts.get(dest.id) is not dest or dest.state not in _ROUTABLE:  # gone meanwhile: recompute
            dest.kv_used -= r.kv_tokens
            r.resume = True
            self.held.appendleft(r)
            self._pump()
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

    def _node_full(self, node: NodeState, pump: bool = True) -> None:
        now = self.loop.now()
        inst = node.inst
        if inst is None or inst.state is not InstanceState.LOADING:
            return
        inst.state = InstanceState.FULL
        inst.view = None
        node.gpu_last_used = now
        tl = node.timeline
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
            self._pump()

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
        arr = np.array([r.arrival for r in self.reqs])
        first = np.array([r.first_token for r in self.reqs])
        fin = np.array([r.finish for r in self.reqs])
        outs = np.array([r.out for r in self.reqs])
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(outs > 1, (fin - first) / np.maximum(1, outs - 1), np.nan)
        s = np.array(self.series, dtype=float).reshape(-1, 4)
        return SimResult(
            system=self.system.name, ttft=first - arr, tpot=tpot, finish=fin, gpu_seconds=self.gpu_seconds,
            end_time=end, scale_events=self.scale_events, series_t=s[:, 0], series_instances=s[:, 1],
            series_pipelines=s[:, 2], series_rate=s[:, 3] / self.s.sample_interval_s,
            migrations=self.migrations, events=self.loop.processed,
            unfinished=int(np.sum(np.isnan(fin))), kv_shipped=self.kv_shipped)


class _MulticastRun:
    """Plays a :class:`MulticastPlan` round by round on the flow network.

    Round ``t`` starts when every transfer of round ``t-1`` has landed (the reference's
    round-synchronous execution, ``pipe.play(mode="round")``); each send is a flow from the
    sender's NIC to the receiver's NIC, so concurrent scale-outs and copy-backs share links.
    """

    def __init__(self, sim: Simulation, plan: MulticastPlan, order: tuple[int, ...], tl: ScaleTimeline,
                 planner: PipelinePlanner | None, sources: list[int]) -> None:
        self.sim, self.plan, self.order, self.tl, self.planner = sim, plan, order, tl, planner
        self.sources = sources
        self.r = 0
        self.outstanding = 0
        self.chunk_bytes = sim.model.chunk_bytes

    def start_round(self) -> None:
        while self.r < len(self.plan.rounds) and not self.plan.rounds[self.r]:
            self.r += 1
        if self.r >= len(self.plan.rounds):
            self._release_sources()
            return
        sends = self.plan.rounds[self.r]
        self.r += 1
        self.outstanding = len(sends)
        for snd in sends:
            a, b = self.order[snd.src], self.order[snd.dst]
            self.sim.net.start((("out", a), ("in", b)), self.chunk_bytes[snd.chunk], self._landed,
                               tag=(b, snd.chunk), latency_s=self.sim.nic_latency)

    def _landed(self, f: Flow) -> None:
        node, chunk = cast(tuple[int, int], f.tag)
        self.sim._on_chunk(node, chunk, self.tl, self.planner)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.start_round()

    def _release_sources(self) -> None:
        for s in self.sources:
            node = self.sim.nodes[s]
            node.source_busy -= 1
            if node.inst is not None and node.inst.state is InstanceState.DRAINING:
                self.sim._maybe_release(node.inst)


class _ChunkMulticastRun(_MulticastRun):
    """Chunk-level play, no round barrier (``pipe.play(mode="chunk")``): each NIC sends and
    receives in the plan's order, and a send starts once its sender holds the chunk and both NIC
    sides finished their previous transfer. Sends are flows, so they share links with anything
    else moving at the time."""

    def start(self) -> None:
        sends = [snd for rnd in self.plan.rounds for snd in rnd]
        self.sends = sends
        self.left = len(sends)
        if not sends:
            self._release_sources()
            return
        last_out: dict[int, int] = {}
        last_in: dict[int, int] = {}
        self.waits = [0] * len(sends)
        self.after_out: dict[int, int] = {}  # send -> next send on the same sender NIC
        self.after_in: dict[int, int] = {}   # send -> next send on the same receiver NIC
        self.want: dict[tuple[int, int], list[int]] = {}  # (endpoint, chunk) -> sends waiting for it
        src_set = set(self.plan.sources)
        self.have: set[tuple[int, int]] = set()
        for i, snd in enumerate(sends):
            if snd.src in last_out:
                self.after_out[last_out[snd.src]] = i
                self.waits[i] += 1
            if snd.dst in last_in:
                self.after_in[last_in[snd.dst]] = i
                self.waits[i] += 1
            last_out[snd.src] = i
            last_in[snd.dst] = i
            if snd.src not in src_set:
                self.waits[i] += 1
                self.want.setdefault((snd.src, snd.chunk), []).append(i)
        for i in range(len(sends)):
            if self.waits[i] == 0:
                self._go(i)

    def _ready(self, i: int) -> None:
        self.waits[i] -= 1
        if self.waits[i] == 0:
            self._go(i)

    def _go(self, i: int) -> None:
        snd = self.sends[i]
        a, b = self.order[snd.src], self.order[snd.dst]
        self.sim.net.start((("out", a), ("in", b)), self.chunk_bytes[snd.chunk], self._chunk_landed,
                           tag=i, latency_s=self.sim.nic_latency, sent=self._sent)

    def _sent(self, f: Flow) -> None:
        i = cast(int, f.tag)
        for nxt in (self.after_out.get(i), self.after_in.get(i)):
            if nxt is not None:
                self._ready(nxt)

    def _chunk_landed(self, f: Flow) -> None:
        snd = self.sends[cast(int, f.tag)]
        key = (snd.dst, snd.chunk)
        if key not in self.have:
            self.have.add(key)
            self.sim._on_chunk(self.order[snd.dst], snd.chunk, self.tl, self.planner)
            for j in self.want.pop(key, ()):
                self._ready(j)
        self.left -= 1
        if self.left == 0:
            self._release_sources()
