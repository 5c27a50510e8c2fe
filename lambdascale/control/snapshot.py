"""What the control policies see: the cluster snapshot, frozen and typed.

A :class:`ClusterSnapshot` is an immutable picture of the cluster that the real controller builds
from its node agents and the simulator builds from its model state. It holds absolute timestamps
(``last_request_at``, ``last_used``) but never the current time: every policy receives ``now``
separately, so one snapshot can be evaluated at any instant and the same inputs always give the
same decision.

Conventions:

- Node ids are ints (``0..N-1`` in the simulator, the agent index in the real cluster), matching
  the node ids of ``pipe.plan_multicast``.
- An *instance* is anything that runs the model: a node loading it (``LOADING``), a λPipe pipeline
  across receivers (``PIPELINED``, several stages), a node serving alone (``FULL``) or one being
  removed (``DRAINING``). Pipelines are temporary helpers formed from loading nodes, so the
  autoscaler counts ``LOADING`` and ``FULL`` instances and the router uses ``FULL`` and
  ``PIPELINED`` ones.
- A :class:`Holding` says that one tier of one node holds a model, all of it (``blocks is None``)
  or, while a load or copy is in progress, some execution blocks.

Example (a simulator or the gateway building a snapshot)::

    spec = DeploymentSpec(min_instances=0, max_instances=8, target_concurrency=4)
    node0 = NodeView(id=0, gpus_total=1, gpus_free=1, host_bytes_total=64 << 30, host_bytes_free=50 << 30,
                     holdings=(Holding("llama2-7b", Tier.HOST, nbytes=14 << 30, last_used=0.0),))
    model = ModelView(name="llama2-7b", spec=spec, size_bytes=14 << 30, n_blocks=8, queue_len=3)
    snap = ClusterSnapshot(nodes=(node0,), models=(model,))

The vocabulary (:class:`Tier`, :class:`InstanceState`, :class:`DeploymentSpec`,
:class:`SnapshotError`) lives in :mod:`lambdascale.control.spec` and the policies' decisions
(:class:`ScaleDecision`, :class:`ScalePlan`, :class:`MemoryPlan`, :class:`RouteDecision`, ...)
in :mod:`lambdascale.control.decisions`; this module re-exports both, so the one import
``from lambdascale.control.snapshot import ...`` of the whole contract keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdascale.control.decisions import (
    CopyBack,
    EvictReason,
    Eviction,
    MemoryPlan,
    RejectReason,
    RouteDecision,
    RouteKind,
    ScaleDecision,
    ScalePlan,
    ScaleReason,
    Source,
    Target,
)
from lambdascale.control.settings import MulticastAlgo
from lambdascale.control.spec import (
    CACHE_TIERS,
    SOURCE_TIERS,
    DeploymentSpec,
    InstanceState,
    SnapshotError,
    Tier,
    require,
)


@dataclass(frozen=True, slots=True)
class Holding:
    """One tier of one node holds (part of) a model.

    ``blocks`` is None for a complete copy, else the execution block indices present so far (a
    load, multicast or copy-back in progress). ``last_used`` is the time the copy last served or
    fed a load (LRU key). ``pinned`` marks a copy the owner must not lose right now (e.g. an active
    multicast source the snapshot builder knows about).
    """

    model: str
    tier: Tier
    nbytes: int
    last_used: float = 0.0
    blocks: frozenset[int] | None = None
    pinned: bool = False

    def __post_init__(self) -> None:
        w = f"Holding({self.model!r}, {self.tier.value})"
        require(self.tier is not Tier.NONE, w, "tier none cannot hold a model")
        require(self.nbytes >= 0, w, f"nbytes={self.nbytes} must be >= 0")

    @property
    def complete(self) -> bool:
        """True when every block is present."""
        return self.blocks is None


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node: GPUs, cache-tier capacities (bytes) and what each tier holds.

    ``*_bytes_free`` is what the store reports free; it already accounts for every holding
    (complete or partial) listed in ``holdings``.
    """

    id: int
    gpus_total: int
    gpus_free: int
    host_bytes_total: int = 0
    host_bytes_free: int = 0
    ssd_bytes_total: int = 0
    ssd_bytes_free: int = 0
    holdings: tuple[Holding, ...] = ()

    def __post_init__(self) -> None:
        w = f"NodeView(id={self.id})"
        require(self.id >= 0, w, "id must be >= 0")
        require(0 <= self.gpus_free <= self.gpus_total, w, f"gpus_free={self.gpus_free} must be in [0, gpus_total={self.gpus_total}]")
        require(0 <= self.host_bytes_free <= self.host_bytes_total, w,
                 f"host_bytes_free={self.host_bytes_free} must be in [0, host_bytes_total={self.host_bytes_total}]")
        require(0 <= self.ssd_bytes_free <= self.ssd_bytes_total, w,
                 f"ssd_bytes_free={self.ssd_bytes_free} must be in [0, ssd_bytes_total={self.ssd_bytes_total}]")
        seen = set()
        for h in self.holdings:
            key = (h.model, h.tier)
            require(key not in seen, w, f"two holdings of {h.model!r} in tier {h.tier.value}")
            seen.add(key)

    def holding(self, model: str, tier: Tier) -> Holding | None:
        """The holding of ``model`` in ``tier``, or None."""
        for h in self.holdings:
            if h.model == model and h.tier is tier:
                return h
        return None

    def fastest_tier(self, model: str) -> Tier:
        """Fastest tier holding a *complete* copy of ``model`` (``Tier.NONE`` if none)."""
        best = Tier.NONE
        for h in self.holdings:
            if h.model == model and h.complete and h.tier.rank < best.rank:
                best = h.tier
        return best

    def bytes_total(self, tier: Tier) -> int:
        """Capacity of a cache tier (host or SSD) in bytes."""
        return {Tier.HOST: self.host_bytes_total, Tier.SSD: self.ssd_bytes_total}.get(tier, 0)

    def bytes_free(self, tier: Tier) -> int:
        """Free bytes of a cache tier (host or SSD)."""
        return {Tier.HOST: self.host_bytes_free, Tier.SSD: self.ssd_bytes_free}.get(tier, 0)


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of an instance: a node running execution blocks ``[block_start, block_end)``."""

    node: int
    block_start: int
    block_end: int

    def __post_init__(self) -> None:
        require(0 <= self.block_start < self.block_end, f"Stage(node={self.node})",
                 f"block range [{self.block_start}, {self.block_end}) is empty or negative")


@dataclass(frozen=True, slots=True)
class InstanceView:
    """A running (or starting) copy of a model.

    ``stages`` is one stage over every block for a loading or full instance and several for a λPipe
    pipeline. ``capacity`` is how many requests it admits at once (a pipeline: at least its stage
    count). ``outstanding_tokens`` counts prompt tokens not yet prefilled plus tokens still to
    generate (max_tokens minus generated) over its admitted requests. ``step_slots`` is how many
    steps it runs at once, each over its own requests with its own prefill budget (a pipeline's
    micro-batches; 1 for a full instance).
    """

    id: str
    model: str
    state: InstanceState
    stages: tuple[Stage, ...]
    capacity: int = 1
    outstanding_requests: int = 0
    outstanding_tokens: int = 0
    step_slots: int = 1

    def __post_init__(self) -> None:
        w = f"InstanceView({self.id!r})"
        require(len(self.stages) >= 1, w, "needs at least one stage")
        require(self.capacity >= 1, w, f"capacity={self.capacity} must be >= 1")
        require(self.outstanding_requests >= 0, w, f"outstanding_requests={self.outstanding_requests} must be >= 0")
        require(self.outstanding_tokens >= 0, w, f"outstanding_tokens={self.outstanding_tokens} must be >= 0")
        require(self.step_slots >= 1, w, f"step_slots={self.step_slots} must be >= 1")
        for a, b in zip(self.stages, self.stages[1:]):
            require(a.block_end == b.block_start, w, "stages must cover contiguous block ranges in order")

    @property
    def nodes(self) -> tuple[int, ...]:
        """Nodes of its stages, in pipeline order."""
        return tuple(s.node for s in self.stages)

    @property
    def counts_as_instance(self) -> bool:
        """True for the states the autoscaler counts (``LOADING`` and ``FULL``)."""
        return self.state in (InstanceState.LOADING, InstanceState.FULL)

    @property
    def routable(self) -> bool:
        """True for the states the router may send requests to (``FULL`` and ``PIPELINED``)."""
        return self.state in (InstanceState.FULL, InstanceState.PIPELINED)


@dataclass(frozen=True, slots=True)
class ModelView:
    """A deployed model: its spec, size, instances and load.

    ``queue_len`` counts requests waiting for a slot (held requests included); ``in_flight`` those
    admitted to an instance. ``arrival_rate`` is requests/s over the observer's window and
    ``service_time_s`` the observed mean request duration (0 = unknown); when both are known the
    autoscaler also sizes for ``arrival_rate * service_time_s`` concurrent requests (Little's law).
    ``last_scale_at`` is when the model was last scaled out or in (None = never).
    """

    name: str
    spec: DeploymentSpec
    size_bytes: int
    n_blocks: int
    instances: tuple[InstanceView, ...] = ()
    queue_len: int = 0
    in_flight: int = 0
    arrival_rate: float = 0.0
    service_time_s: float = 0.0
    last_request_at: float | None = None
    last_scale_at: float | None = None

    def __post_init__(self) -> None:
        w = f"ModelView({self.name!r})"
        require(bool(self.name), w, "name must not be empty")
        require(self.size_bytes >= 0, w, f"size_bytes={self.size_bytes} must be >= 0")
        require(self.n_blocks >= 1, w, f"n_blocks={self.n_blocks} must be >= 1")
        require(self.queue_len >= 0, w, f"queue_len={self.queue_len} must be >= 0")
        require(self.in_flight >= 0, w, f"in_flight={self.in_flight} must be >= 0")
        require(self.arrival_rate >= 0, w, f"arrival_rate={self.arrival_rate} must be >= 0")
        require(self.service_time_s >= 0, w, f"service_time_s={self.service_time_s} must be >= 0")
        ids = set()
        for inst in self.instances:
            require(inst.model == self.name, w, f"instance {inst.id!r} belongs to model {inst.model!r}")
            require(inst.id not in ids, w, f"duplicate instance id {inst.id!r}")
            ids.add(inst.id)

    @property
    def counted_instances(self) -> tuple[InstanceView, ...]:
        """Instances the autoscaler counts (loading and full)."""
        return tuple(i for i in self.instances if i.counts_as_instance)

    def instance(self, instance_id: str) -> InstanceView | None:
        """The instance with this id, or None."""
        for i in self.instances:
            if i.id == instance_id:
                return i
        return None


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Nodes and deployed models at one instant; holds no notion of the current time."""

    nodes: tuple[NodeView, ...] = ()
    models: tuple[ModelView, ...] = ()

    def __post_init__(self) -> None:
        ids = [n.id for n in self.nodes]
        require(len(set(ids)) == len(ids), "ClusterSnapshot", f"duplicate node ids in {ids}")
        names = [m.name for m in self.models]
        require(len(set(names)) == len(names), "ClusterSnapshot", f"duplicate model names in {names}")
        known = set(ids)
        for m in self.models:
            for inst in m.instances:
                for s in inst.stages:
                    require(s.node in known, f"ClusterSnapshot: instance {inst.id!r}", f"stage on unknown node {s.node}")

    def node(self, node_id: int) -> NodeView:
        """The node with this id (KeyError naming it if absent)."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id} in snapshot (nodes: {[n.id for n in self.nodes]})")

    def model(self, name: str) -> ModelView | None:
        """The model with this name, or None when it is not deployed."""
        for m in self.models:
            if m.name == name:
                return m
        return None


__all__ = [
    "CACHE_TIERS",
    "SOURCE_TIERS",
    "ClusterSnapshot",
    "CopyBack",
    "DeploymentSpec",
    "EvictReason",
    "Eviction",
    "Holding",
    "InstanceState",
    "InstanceView",
    "MemoryPlan",
    "ModelView",
    "MulticastAlgo",
    "NodeView",
    "RejectReason",
    "RouteDecision",
    "RouteKind",
    "ScaleDecision",
    "ScalePlan",
    "ScaleReason",
    "SnapshotError",
    "Source",
    "Stage",
    "Target",
    "Tier",
]
