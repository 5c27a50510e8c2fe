"""What the control policies see and what they decide: frozen, typed contract objects.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lambdascale.control.settings import MulticastAlgo
from lambdascale.errors import LambdaScaleError


class SnapshotError(LambdaScaleError, ValueError):
    """A snapshot or deployment spec is inconsistent; the message names the object and field."""


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise SnapshotError(f"{where}: {msg}")


class Tier(str, Enum):
    """Where a node keeps a model, fastest first. ``NONE`` means the node does not hold it."""

    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"
    NONE = "none"

    @property
    def rank(self) -> int:
        """0 for the fastest tier (GPU) up to 3 for ``NONE``; lower loads faster."""
        return _TIER_RANK[self]

    def faster_than(self, other: "Tier") -> bool:
        """True when a start from this tier is faster than one from ``other``."""
        return self.rank < other.rank

    # Order by speed, not alphabetically (a str enum would otherwise sort "none" before "ssd").
    def __lt__(self, other: object) -> bool:
        if isinstance(other, Tier):
            return self.rank < other.rank
        return NotImplemented

    def __le__(self, other: object) -> bool:
        if isinstance(other, Tier):
            return self.rank <= other.rank
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if isinstance(other, Tier):
            return self.rank > other.rank
        return NotImplemented

    def __ge__(self, other: object) -> bool:
        if isinstance(other, Tier):
            return self.rank >= other.rank
        return NotImplemented


_TIER_RANK = {Tier.GPU: 0, Tier.HOST: 1, Tier.SSD: 2, Tier.NONE: 3}

#: tiers whose holders can act as network multicast sources (SSD is too slow to feed a NIC).
SOURCE_TIERS: tuple[Tier, ...] = (Tier.GPU, Tier.HOST)
#: tiers the memory manager caches into and may evict from (GPU memory belongs to instances).
CACHE_TIERS: tuple[Tier, ...] = (Tier.HOST, Tier.SSD)


class InstanceState(str, Enum):
    """Life cycle of an instance: loading -> (pipelined stages serve) -> full -> draining."""

    LOADING = "loading"
    PIPELINED = "pipelined"
    FULL = "full"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """A model's scaling settings, as registered through the admin API.

    ``cache_tiers`` lists where copies of the model are kept between scale events: host and SSD
    copies are made (copied back after a scale-out) and kept LRU with keep-alive; ``gpu`` keeps a
    GPU copy whose instance was removed until keep-alive expires (without it, such a copy is
    dropped at once). Strings are accepted (``["host", "ssd"]``).
    ``scale_to_zero=False`` keeps at least one instance at all times.
    """

    min_instances: int = 0
    max_instances: int = 8
    target_concurrency: int = 4
    keep_alive_s: float = 60.0
    cache_tiers: tuple[Tier, ...] = (Tier.HOST, Tier.SSD)
    scale_to_zero: bool = True
    gpus_per_instance: int = 1

    def __post_init__(self) -> None:
        w = "DeploymentSpec"
        _require(0 <= self.min_instances <= 10_000, w, f"min_instances={self.min_instances} must be in [0, 10000]")
        _require(
            self.min_instances <= self.max_instances <= 10_000,
            w,
            f"max_instances={self.max_instances} must be in [min_instances={self.min_instances}, 10000]",
        )
        _require(self.scale_to_zero or self.max_instances >= 1, w, "scale_to_zero=False needs max_instances >= 1")
        _require(1 <= self.target_concurrency <= 100_000, w, f"target_concurrency={self.target_concurrency} must be in [1, 100000]")
        _require(0 <= self.keep_alive_s <= 7 * 86400, w, f"keep_alive_s={self.keep_alive_s} must be in [0, 604800]")
        _require(1 <= self.gpus_per_instance <= 64, w, f"gpus_per_instance={self.gpus_per_instance} must be in [1, 64]")
        # Accept strings and lists (admin API bodies, SQLite rows): store a tuple of Tier.
        try:
            tiers = tuple(Tier(t) for t in self.cache_tiers)
        except ValueError as e:
            raise SnapshotError(f"{w}: cache_tiers={list(self.cache_tiers)!r}: {e}") from None
        object.__setattr__(self, "cache_tiers", tiers)
        for t in tiers:
            _require(t is not Tier.NONE, w, "cache_tiers cannot hold 'none'")
        _require(len(set(self.cache_tiers)) == len(self.cache_tiers), w, f"cache_tiers has duplicates: {self.cache_tiers}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DeploymentSpec":
        """Build from a registration dict (admin API body, SQLite row); ``tiers`` is accepted for
        ``cache_tiers`` and ``name`` is ignored. An unknown key raises :class:`SnapshotError` naming it."""
        fields = {"min_instances", "max_instances", "target_concurrency", "keep_alive_s", "cache_tiers",
                  "scale_to_zero", "gpus_per_instance"}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key == "name":
                continue
            k = "cache_tiers" if key == "tiers" else key
            if k not in fields:
                raise SnapshotError(f"DeploymentSpec: unknown field {key!r} (known: {sorted(fields | {'tiers'})})")
            kw[k] = tuple(value) if k == "cache_tiers" else value
        return cls(**kw)

    @property
    def floor(self) -> int:
        """Fewest instances the autoscaler keeps: ``min_instances``, at least 1 without scale-to-zero."""
        return max(self.min_instances, 0 if self.scale_to_zero else 1)


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
        _require(self.tier is not Tier.NONE, w, "tier none cannot hold a model")
        _require(self.nbytes >= 0, w, f"nbytes={self.nbytes} must be >= 0")

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
        _require(self.id >= 0, w, "id must be >= 0")
        _require(0 <= self.gpus_free <= self.gpus_total, w, f"gpus_free={self.gpus_free} must be in [0, gpus_total={self.gpus_total}]")
        _require(0 <= self.host_bytes_free <= self.host_bytes_total, w,
                 f"host_bytes_free={self.host_bytes_free} must be in [0, host_bytes_total={self.host_bytes_total}]")
        _require(0 <= self.ssd_bytes_free <= self.ssd_bytes_total, w,
                 f"ssd_bytes_free={self.ssd_bytes_free} must be in [0, ssd_bytes_total={self.ssd_bytes_total}]")
        seen = set()
        for h in self.holdings:
            key = (h.model, h.tier)
            _require(key not in seen, w, f"two holdings of {h.model!r} in tier {h.tier.value}")
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
        _require(0 <= self.block_start < self.block_end, f"Stage(node={self.node})",
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
        _require(len(self.stages) >= 1, w, "needs at least one stage")
        _require(self.capacity >= 1, w, f"capacity={self.capacity} must be >= 1")
        _require(self.outstanding_requests >= 0, w, f"outstanding_requests={self.outstanding_requests} must be >= 0")
        _require(self.outstanding_tokens >= 0, w, f"outstanding_tokens={self.outstanding_tokens} must be >= 0")
        _require(self.step_slots >= 1, w, f"step_slots={self.step_slots} must be >= 1")
        for a, b in zip(self.stages, self.stages[1:]):
            _require(a.block_end == b.block_start, w, "stages must cover contiguous block ranges in order")

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
        _require(bool(self.name), w, "name must not be empty")
        _require(self.size_bytes >= 0, w, f"size_bytes={self.size_bytes} must be >= 0")
        _require(self.n_blocks >= 1, w, f"n_blocks={self.n_blocks} must be >= 1")
        _require(self.queue_len >= 0, w, f"queue_len={self.queue_len} must be >= 0")
        _require(self.in_flight >= 0, w, f"in_flight={self.in_flight} must be >= 0")
        _require(self.arrival_rate >= 0, w, f"arrival_rate={self.arrival_rate} must be >= 0")
        _require(self.service_time_s >= 0, w, f"service_time_s={self.service_time_s} must be >= 0")
        ids = set()
        for inst in self.instances:
            _require(inst.model == self.name, w, f"instance {inst.id!r} belongs to model {inst.model!r}")
            _require(inst.id not in ids, w, f"duplicate instance id {inst.id!r}")
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
        _require(len(set(ids)) == len(ids), "ClusterSnapshot", f"duplicate node ids in {ids}")
        names = [m.name for m in self.models]
        _require(len(set(names)) == len(names), "ClusterSnapshot", f"duplicate model names in {names}")
        known = set(ids)
        for m in self.models:
            for inst in m.instances:
                for s in inst.stages:
                    _require(s.node in known, f"ClusterSnapshot: instance {inst.id!r}", f"stage on unknown node {s.node}")

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


# ---- decisions -------------------------------------------------------------------------------


class ScaleReason(str, Enum):
    """Why the autoscaler chose a count."""

    STEADY = "steady"  # no change
    LOAD = "load"  # load above the scale-up threshold
    MIN_INSTANCES = "min_instances"  # below the floor (min_instances / no scale-to-zero)
    MAX_INSTANCES = "max_instances"  # above max_instances (spec lowered)
    UNDERLOADED = "underloaded"  # load below the scale-down threshold after the cooldown
    KEEP_ALIVE_EXPIRED = "keep_alive_expired"  # idle past keep-alive: scale to zero / the floor


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """The autoscaler's verdict for one model: add ``add`` instances or remove ``remove`` (ids).

    ``current`` counts loading + full instances; ``desired`` is the count the decision aims at
    (``current + add - len(remove)``).
    """

    model: str
    current: int
    desired: int
    add: int = 0
    remove: tuple[str, ...] = ()
    reason: ScaleReason = ScaleReason.STEADY
    detail: str = ""

    def __post_init__(self) -> None:
        w = f"ScaleDecision({self.model!r})"
        _require(self.add >= 0, w, f"add={self.add} must be >= 0")
        _require(not (self.add and self.remove), w, "cannot both add and remove instances")
        _require(self.desired == self.current + self.add - len(self.remove), w, "desired != current + add - removed")

    @property
    def is_noop(self) -> bool:
        """True when nothing changes."""
        return self.add == 0 and not self.remove


@dataclass(frozen=True, slots=True)
class Target:
    """A node that will start an instance; ``local_tier`` is where it loads from (``NONE``: network or store)."""

    node: int
    local_tier: Tier
    gpus: int = 1


@dataclass(frozen=True, slots=True)
class Source:
    """A holder that sends blocks to the network targets, and the tier it sends from."""

    node: int
    tier: Tier


@dataclass(frozen=True, slots=True)
class ScalePlan:
    """Where a scale-out of one model goes and how its weights travel.

    Targets with ``local_tier`` GPU/host/SSD load from their own copy; the others
    (:attr:`network_targets`) receive blocks from ``sources`` by ``algo``. With no sources at all
    they load from the model store (the checkpoint on shared storage). ``unplaced`` is how many of
    the requested instances found no node with free GPUs.

    To call ``pipe.plan_multicast``, number nodes by :meth:`multicast_nodes` (sources first)::

        order = plan.multicast_nodes()
        mc = plan_multicast(plan.algo.value, len(order), len(plan.sources), n_blocks, n_chunks)
        # plan node i is cluster node order[i]
    """

    model: str
    targets: tuple[Target, ...]
    sources: tuple[Source, ...] = ()
    algo: MulticastAlgo = MulticastAlgo.BINOMIAL
    execute_while_load: bool = False
    unplaced: int = 0

    @property
    def network_targets(self) -> tuple[int, ...]:
        """Target nodes that fetch over the network (or from the store when there is no source)."""
        return tuple(t.node for t in self.targets if t.local_tier is Tier.NONE)

    @property
    def local_targets(self) -> tuple[Target, ...]:
        """Targets that load from their own GPU/host/SSD copy."""
        return tuple(t for t in self.targets if t.local_tier is not Tier.NONE)

    def multicast_nodes(self) -> tuple[int, ...]:
        """Sources then network targets: index i is node i of the multicast plan (empty without sources)."""
        if not self.sources:
            return ()
        return tuple(s.node for s in self.sources) + self.network_targets


class EvictReason(str, Enum):
    """Why the memory manager drops a cached copy."""

    UNDEPLOYED = "undeployed"  # the model is no longer deployed
    TIER_NOT_CACHED = "tier_not_cached"  # its spec no longer caches in this tier
    MAKE_ROOM = "make_room"  # LRU victim to fit a copy-back
    IDLE_GPU = "idle_gpu"  # GPU copy with no instance on the node, idle past keep-alive


@dataclass(frozen=True, slots=True)
class Eviction:
    """Drop ``model``'s copy in ``tier`` on ``node``, freeing ``nbytes``."""

    node: int
    model: str
    tier: Tier
    nbytes: int
    reason: EvictReason


@dataclass(frozen=True, slots=True)
class CopyBack:
    """Copy ``model`` on ``node`` from its ``from_tier`` copy into ``to_tier`` in the background."""

    node: int
    model: str
    from_tier: Tier
    to_tier: Tier
    nbytes: int


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Evictions to apply first, then copy-backs (which fit once the evictions are done)."""

    evictions: tuple[Eviction, ...] = ()
    copy_backs: tuple[CopyBack, ...] = ()

    @property
    def is_noop(self) -> bool:
        """True when nothing is to be done."""
        return not self.evictions and not self.copy_backs


class RouteKind(str, Enum):
    """What the router decided for one request."""

    INSTANCE = "instance"  # send it to ``instance_id`` (a full instance or a pipeline)
    HOLD = "hold"  # keep it queued: an instance is starting or a slot will free up
    REJECT = "reject"  # refuse it (gateway: 429 with Retry-After, or 404 for an unknown model)


class RejectReason(str, Enum):
    """Why a request was rejected."""

    UNKNOWN_MODEL = "unknown_model"
    HOLD_QUEUE_FULL = "hold_queue_full"
    NOT_SCALABLE = "not_scalable"  # max_instances == 0 and nothing runs


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes. Build with :meth:`to`, :meth:`hold` or :meth:`reject`."""

    kind: RouteKind
    instance_id: str | None = None
    reject_reason: RejectReason | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        _require((self.kind is RouteKind.INSTANCE) == (self.instance_id is not None), "RouteDecision",
                 "instance_id is set exactly when kind is instance")
        _require((self.kind is RouteKind.REJECT) == (self.reject_reason is not None), "RouteDecision",
                 "reject_reason is set exactly when kind is reject")

    @classmethod
    def to(cls, instance_id: str, detail: str = "") -> "RouteDecision":
        return cls(RouteKind.INSTANCE, instance_id=instance_id, detail=detail)

    @classmethod
    def hold(cls, detail: str = "") -> "RouteDecision":
        return cls(RouteKind.HOLD, detail=detail)

    @classmethod
    def reject(cls, reason: RejectReason, detail: str = "") -> "RouteDecision":
        return cls(RouteKind.REJECT, reject_reason=reason, detail=detail)


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
