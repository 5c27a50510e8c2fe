"""What the control policies decide: frozen, typed decisions about one model.

The autoscaler returns a :class:`ScaleDecision`, placement a :class:`ScalePlan` (targets,
sources, multicast algorithm), the memory manager a :class:`MemoryPlan` (evictions, copy-backs)
and the router a :class:`RouteDecision`. Each validates itself on construction
(:class:`~lambdascale.control.spec.SnapshotError` names the field).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lambdascale.control.settings import MulticastAlgo
from lambdascale.control.spec import Tier, require


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
        require(self.add >= 0, w, f"add={self.add} must be >= 0")
        require(not (self.add and self.remove), w, "cannot both add and remove instances")
        require(self.desired == self.current + self.add - len(self.remove), w, "desired != current + add - removed")

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
        require((self.kind is RouteKind.INSTANCE) == (self.instance_id is not None), "RouteDecision",
                 "instance_id is set exactly when kind is instance")
        require((self.kind is RouteKind.REJECT) == (self.reject_reason is not None), "RouteDecision",
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
    "CopyBack",
    "EvictReason",
    "Eviction",
    "MemoryPlan",
    "RejectReason",
    "RouteDecision",
    "RouteKind",
    "ScaleDecision",
    "ScalePlan",
    "ScaleReason",
    "Source",
    "Target",
]
