"""The simulator's state: requests, instances, nodes, and the :class:`SimState` every layer of
:class:`~lambdascale.sim.simulator.Simulation` builds on.

The simulation is layered, each layer one module and one concern, each calling only the layers
below it (and the three hooks :class:`SimState` declares for the layers above)::

    SimState (this module: cluster, network, nodes, requests, counters)
      └─ Views        (sim/views.py: the control plane's snapshot of it)
          └─ Instances    (sim/instances.py: batch steps, micro-batches, lending device time)
              └─ Arrivals     (sim/arrivals.py: the gateway queue and late-binding dispatch)
                  └─ ScaleOuts    (sim/scaleouts.py: loads, multicasts, λPipe pipelines, KV shipping)
                      └─ Simulation   (sim/simulator.py: the controller pass, start, run)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import InstanceView, NodeView
from lambdascale.control.spec import DeploymentSpec, InstanceState, Tier
from lambdascale.control.timeline import ScaleTimeline
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


class SimState:
    """Everything a simulation holds; no behaviour but the hooks the upper layers implement.

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

    # ---- hooks: implemented by the layers above, called by those below -----------------------

    def _pump(self) -> None:
        """Dispatch held requests (:class:`~lambdascale.sim.arrivals.Arrivals`)."""
        raise NotImplementedError

    def _control_pass(self) -> None:
        """Observe -> decide -> act (:class:`~lambdascale.sim.simulator.Simulation`)."""
        raise NotImplementedError

    def _remove(self, iid: str) -> None:
        """Drain and remove instance ``iid`` (:class:`~lambdascale.sim.simulator.Simulation`)."""
        raise NotImplementedError
