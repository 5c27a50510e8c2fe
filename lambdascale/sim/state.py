"""The simulator's state: requests, instances, nodes, models, and the :class:`SimState` every
layer of :class:`~lambdascale.sim.simulator.Simulation` builds on.

Many models share one cluster (a catalogue, :mod:`lambdascale.sim.catalogue`): each
:class:`ModelRun` holds one model's shape, cost model, deployment spec and gateway queue; each
:class:`NodeState` holds, per model, its instance on that node, the chunks its GPUs hold, and the
copies its host pool and SSD keep. Memory is finite everywhere: a node's GPUs go to one instance
each (weights plus that instance's KV cache, sized from the GPUs' memory), its host pool and SSD
hold what fits (``host_used``/``ssd_used`` count complete and in-progress copies, so nothing is
ever over-committed).

The simulation is layered, each layer one module and one concern, each calling only the layers
below it (and the three hooks :class:`SimState` declares for the layers above)::

    SimState (this module: cluster, network, nodes, models, requests, counters)
      └─ Views        (sim/views.py: the control plane's snapshot of it)
          └─ Instances    (sim/instances.py: batch steps, micro-batches, lending device time)
              └─ Arrivals     (sim/arrivals.py: the gateway queue and late-binding dispatch)
                  └─ ScaleOuts    (sim/scaleouts.py: loads, multicasts, λPipe pipelines, KV shipping)
                      └─ Faults       (sim/faults.py: nodes that pause or crash, die and return)
                          └─ Simulation   (sim/simulator.py: the controller pass, start, run)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import InstanceView, ModelView, NodeView
from lambdascale.control.spec import DeploymentSpec, InstanceState, Tier
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.membership import MemberState
from lambdascale.pipe.pipeline_types import Pipeline
from lambdascale.pipe.pipelines import PipelinePlanner
from lambdascale.sim.cluster import ClusterSpec, SimModel
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.events import EventHandle, EventLoop
from lambdascale.sim.metrics import ScaleRecord
from lambdascale.sim.network import Network
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.systems.base import System
from lambdascale.sim.workload import Workload

if TYPE_CHECKING:
    from lambdascale.sim.catalogue import SimEntry

ROUTABLE = (InstanceState.FULL, InstanceState.PIPELINED)
GB = 1e9
GIB = float(1 << 30)


@dataclass(eq=False)
class Req:
    """One request's token state and timestamps (NaN until they happen)."""

    idx: int
    arrival: float
    inp: int
    out: int
    m: "ModelRun | None" = None  # the catalogue model it asks for
    generated: int = 0
    first_token: float = math.nan
    finish: float = math.nan
    migrations: int = 0
    resume: bool = False  # migrated: next prefill recomputes prompt + generated tokens
    kv_ready: bool = False  # migrated with its KV cache shipped to its instance: it decodes on, no prefill

    @property
    def kv_tokens(self) -> int:
        return self.inp + self.out


def prefill_tokens(r: Req) -> int:
    """Tokens the request's first step on an instance prefills (a resumed request recomputes its
    generated tokens too; one whose KV cache was shipped there prefills nothing)."""
    if r.kv_ready:
        return 0
    return r.inp + (r.generated if r.resume else 0)


@dataclass(eq=False)
class Inst:
    """A full instance on one node, or a λPipe pipeline over several loading nodes."""

    id: str
    state: InstanceState
    stages: tuple[tuple[int, int, int], ...]  # (node, block_start, block_end)
    capacity: int
    kv_capacity: int
    m: "ModelRun"
    pipeline: Pipeline | None = None
    comm_s_per_token: float = 0.0
    comm_latency_s: float = 0.0
    running: list[Req] = field(default_factory=list)
    pending: deque[Req] = field(default_factory=deque)
    kv_used: int = 0
    incoming: int = 0  # requests whose KV cache is being shipped here (slot and KV reserved)
    # λPipe micro-batching: steps in flight at once, and the busiest node's share of the blocks
    slots: int = 1
    step_tokens: int = 0  # one step's token budget (pipe.serving.pipeline_step_tokens; set by _new_inst)
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
    gpu_since: float | None = None  # a node's own instance: when it took its GPUs (GPU-seconds)

    view: InstanceView | None = None  # cached contract view; None after any change

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.pending) + len(self.seg_new) + self.incoming

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(s[0] for s in self.stages)

    @property
    def receivers(self) -> tuple[int, ...]:
        """Its stage nodes that are not lending helpers, once each (a full instance: its node)."""
        return tuple(n for n in dict.fromkeys(self.nodes) if n not in self.helper_share)

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
class ModelRun:
    """One catalogue model in a simulation: shape, cost model, spec, and its gateway's state.

    ``net_Bps`` is what one of its instances moves over the network (all its NICs together,
    ``ClusterSpec.instance_net_Bps``); ``kv_capacity`` the KV tokens one instance holds (its GPUs'
    memory less the weights, times ``sim.kv_memory_fraction``).
    """

    idx: int
    model: SimModel
    cost: CostModel
    spec: DeploymentSpec
    weight: float
    kv_capacity: int
    kv_tok: int
    act_bytes: int
    net_Bps: float
    shape: str = ""
    held: deque[Req] = field(default_factory=deque)
    recent: deque[float] = field(default_factory=deque)
    svc_ewma: float = 0.0
    last_request_at: float | None = None
    last_scale_at: float | None = None
    insts: dict[str, Inst] = field(default_factory=dict)
    version: int = 0  # bumped on every change its model view depends on (views.py caches by it)
    view: ModelView | None = None
    view_key: tuple[Any, ...] = ()
    # per-model counters for the report
    starts: dict[str, int] = field(default_factory=dict)  # tier a new instance loaded from -> count
    bytes_by_tier: dict[str, float] = field(default_factory=dict)  # tier -> bytes moved to GPUs from it
    evictions: int = 0

    @property
    def name(self) -> str:
        return self.model.name


@dataclass(eq=False)
class NodeState:
    """What a node holds, per model, and the instances its GPUs run."""

    id: int
    gpus_total: int
    gpus_free: int
    host_total: int = 0
    ssd_total: int = 0
    insts: dict[str, Inst] = field(default_factory=dict)  # model -> the node's own (loading or full) instance
    # model -> chunks on its GPUs (loading or full); a model with no instance here: a device copy kept through a pause
    chunks: dict[str, set[int]] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # complete host copies: model -> last used
    host_partial: set[str] = field(default_factory=set)
    ssd: set[str] = field(default_factory=set)
    ssd_partial: set[str] = field(default_factory=set)
    host_used: int = 0  # bytes of complete and in-progress host copies
    ssd_used: int = 0
    gpu_last_used: dict[str, float] = field(default_factory=dict)
    source_busy: dict[str, int] = field(default_factory=dict)  # model -> multicasts using this node's copy now
    timeline: dict[str, ScaleTimeline] = field(default_factory=dict)
    version: int = 0  # bumped on every change its view depends on
    mem_version: int = -1  # the version the memory manager last planned this node at
    host_cache: tuple[Any, tuple[Any, ...]] = ((), ())  # views.py: (inputs, host holdings) last built
    ssd_cache: tuple[Any, tuple[Any, ...]] = ((), ())
    view: NodeView | None = None  # cached contract view and the version it was built from
    view_version: int = -1


class SimState:
    """Everything a simulation holds; no behaviour but the hooks the upper layers implement.

    Everything random was drawn when the workload was generated; the run itself is
    deterministic. All state is per instance (no globals), so simulations can run side by side.

    ``models`` is one :class:`~lambdascale.sim.catalogue.SimEntry` per catalogue model (a single
    :class:`SimModel` with its ``cost`` is accepted too: a one-model catalogue). The workload's
    ``model`` array (catalogue indices, :func:`~lambdascale.sim.catalogue.assign_models`) says
    which model each request asks for; without it every request goes to the first model.
    """

    def __init__(self, workload: Workload, cluster: ClusterSpec, models: "SimModel | Sequence[SimEntry]",
                 system: System, settings: SimSettings, control: ControlSettings, cost: CostModel | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        from lambdascale.sim.catalogue import SimEntry

        entries: list[SimEntry] = ([SimEntry(models, cost, 1.0)] if isinstance(models, SimModel)  # type: ignore[arg-type]
                                   else list(models))
        if not entries:
            raise ValueError("a simulation needs at least one model")
        self.w, self.cluster, self.system, self.s = workload, cluster, system, settings
        self.cfg = system.control_settings(control, settings.baseline_sources)
        if settings.late_binding:  # the gateway's dispatch mode applies to every system alike
            self.cfg = ControlSettings.model_validate({
                **self.cfg.model_dump(), "router_late_binding": True,
                "router_max_waiting_tokens": settings.max_prefill_tokens})
        self.progress = progress
        self.loop = EventLoop()
        ka = settings.keep_alive_s if system.keep_alive_s is None else (
            settings.keepalive_baseline_keep_alive_s if system.keep_alive_s < 0 else system.keep_alive_s)
        # GPUs per node: the preset's (or --gpus-per-node), raised to the largest instance's need
        self.gpus_per_node = max([settings.gpus_per_node or cluster.gpus_per_node] + [e.model.tp for e in entries])
        L = cluster.links
        self.flow_Bps = cluster.flow_Bps()
        self.nic_latency = L.nic_latency_us * 1e-6
        self.pcie_Bps = L.pcie_GBps * GB
        self.models: list[ModelRun] = []
        for i, e in enumerate(entries):
            if e.cost is None:
                raise ValueError(f"model {e.model.name}: no cost model")
            tp = e.model.tp
            spec = DeploymentSpec(
                min_instances=min(settings.min_instances, settings.nodes), max_instances=settings.nodes,
                target_concurrency=settings.target_concurrency, keep_alive_s=ka,
                cache_tiers=system.cache_tiers, scale_to_zero=settings.min_instances == 0, gpus_per_instance=tp)
            kv_tok = e.model.arch.kv_bytes_per_token()
            spare = tp * cluster.gpu.memory_gib * GIB - e.model.nbytes
            self.models.append(ModelRun(
                i, e.model, e.cost, spec, e.weight, max(1, int(spare * settings.kv_memory_fraction / kv_tok)),
                kv_tok, e.model.arch.activation_bytes_per_token(), cluster.instance_net_Bps(tp),
                shape=e.shape or e.model.name))
        self.by_name = {m.name: m for m in self.models}
        if len(self.by_name) != len(self.models):
            raise ValueError("two catalogue models share a name")
        # kept for one-model callers (simulate scaling, tests): the first model's figures
        m0 = self.models[0]
        self.model, self.cost, self.spec, self.kv_capacity, self.kv_tok = m0.model, m0.cost, m0.spec, m0.kv_capacity, m0.kv_tok
        self.nic_Bps = m0.net_Bps
        self.net = Network(self.loop)
        g = self.gpus_per_node
        for n in range(settings.nodes):
            # one NIC per GPU: a node's NICs together; each flow is capped at its instance's rate
            self.net.add_link(("out", n), g * self.flow_Bps)
            self.net.add_link(("in", n), g * self.flow_Bps)
            # Host memory -> GPUs: each load is capped at pcie_GBps (the λScale testbed loads a
            # 4-GPU 70B from host memory at ~54 GB/s in total, 2.55 s, not one figure per GPU);
            # the node's GPUs have a link each, so loads of different instances add up.
            self.net.add_link(("pcie", n), g * self.pcie_Bps)
            self.net.add_link(("d2h", n), g * self.pcie_Bps)
            # the node's NVMe: one figure per node (the 70B's 30 s read used a whole 4-GPU node)
            self.net.add_link(("ssd", n), L.ssd_GBps * GB)
            self.net.add_link(("ssdw", n), L.ssd_GBps * GB)
        host_pool = cluster.host_memory_gib if settings.host_pool_gib is None else settings.host_pool_gib
        # What-if (sim.host_cache_nodes): nodes past it have their pools taken by tenants outside
        # the simulation, so they cache nothing. Default: every node's pool is the simulation's.
        hc = settings.nodes if settings.host_cache_nodes is None else settings.host_cache_nodes
        ssd_total = int(cluster.ssd_gib * GIB)
        self.nodes = [NodeState(n, g, g, host_total=int(host_pool * GIB) if n < hc else 0, ssd_total=ssd_total)
                      for n in range(settings.nodes)]
        self.host_total = [n.host_total for n in self.nodes]
        # membership (sim/faults.py): only alive nodes are in the snapshot; each return is a new incarnation
        self.member: dict[int, MemberState] = {n: MemberState.ALIVE for n in range(settings.nodes)}
        self.incarnation: dict[int, int] = {n: 1 for n in range(settings.nodes)}
        if settings.ssd_preloaded:
            # every node's SSD starts with the catalogue, most popular first, as far as it fits
            for m in sorted(self.models, key=lambda m: (-m.weight, m.idx)):
                for node in self.nodes:
                    if node.ssd_used + m.model.nbytes <= node.ssd_total:
                        node.ssd.add(m.name)
                        node.ssd_used += m.model.nbytes
        idx = workload.model
        self.reqs = [Req(i, float(a), int(x), int(y), self.models[int(idx[i]) if idx is not None else 0])
                     for i, (a, x, y) in enumerate(zip(workload.arrival_s, workload.input_tokens, workload.output_tokens))]
        self._dispatch: EventHandle | None = None  # the pending dispatch of this instant's arrivals
        self._to_dispatch: dict[int, ModelRun] = {}  # models with arrivals at this instant
        self.insts: dict[str, Inst] = {}
        self._inst_seq = 0
        self._event_seq = 0
        self.scale_events: list[ScaleRecord] = []
        self.done = 0
        self.arrived = 0
        self.rejected = 0
        self.migrations = 0
        self.kv_shipped = 0
        self.gpu_seconds = 0.0
        self._copying: set[tuple[int, str, Tier]] = set()
        self._pipelines: dict[int, tuple[PipelinePlanner, ScaleTimeline, dict[Pipeline, Inst], set[int]]] = {}
        # device time a node lent to pipeline stages (sim.pipeline_helper_blocks), not yet taken out
        # of its own instance's steps: a device does one thing at a time. Key: (node, model).
        self._lent_s: dict[tuple[int, str], float] = {}
        self.series: list[tuple[float, int, int, int]] = []
        self.mem_series: list[tuple[float, float, float, float]] = []  # t, GPU, host, SSD occupancy (shares)
        self.evictions = 0
        self._arrivals_in_sample = 0
        self._finished = False
        self._next_memory = 0.0

    # ---- small helpers every layer uses ------------------------------------------------------

    def _touch(self, node: NodeState) -> None:
        """The node's view must be rebuilt (what it holds, runs or has free changed)."""
        node.version += 1

    def _dirty(self, inst: Inst) -> None:
        """The instance changed: its view and its model's view must be rebuilt."""
        inst.view = None
        inst.m.version += 1

    def held_total(self) -> int:
        return sum(len(m.held) for m in self.models)

    # ---- hooks: implemented by the layers above, called by those below -----------------------

    def _pump(self, m: ModelRun | None = None) -> None:
        """Dispatch held requests of ``m`` (all models: None) (:class:`~lambdascale.sim.arrivals.Arrivals`)."""
        raise NotImplementedError

    def _control_pass(self, only: ModelRun | None = None) -> None:
        """Observe -> decide -> act (:class:`~lambdascale.sim.simulator.Simulation`)."""
        raise NotImplementedError

    def _remove(self, iid: str) -> None:
        """Drain and remove instance ``iid`` (:class:`~lambdascale.sim.simulator.Simulation`)."""
        raise NotImplementedError
