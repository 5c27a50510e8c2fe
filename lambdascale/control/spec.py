"""What a deployment asks for and the vocabulary every control contract uses: memory tiers,
instance states, :class:`DeploymentSpec`, and :class:`SnapshotError`.

The contracts built on it: the snapshot policies observe (:mod:`lambdascale.control.snapshot`)
and the decisions they return (:mod:`lambdascale.control.decisions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lambdascale.errors import LambdaScaleError


class SnapshotError(LambdaScaleError, ValueError):
    """A snapshot or deployment spec is inconsistent; the message names the object and field."""


def require(cond: bool, where: str, msg: str) -> None:
    """Raise :class:`SnapshotError` ``"{where}: {msg}"`` unless ``cond`` (the contracts' validation)."""
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
        require(0 <= self.min_instances <= 10_000, w, f"min_instances={self.min_instances} must be in [0, 10000]")
        require(
            self.min_instances <= self.max_instances <= 10_000,
            w,
            f"max_instances={self.max_instances} must be in [min_instances={self.min_instances}, 10000]",
        )
        require(self.scale_to_zero or self.max_instances >= 1, w, "scale_to_zero=False needs max_instances >= 1")
        require(1 <= self.target_concurrency <= 100_000, w, f"target_concurrency={self.target_concurrency} must be in [1, 100000]")
        require(0 <= self.keep_alive_s <= 7 * 86400, w, f"keep_alive_s={self.keep_alive_s} must be in [0, 604800]")
        require(1 <= self.gpus_per_instance <= 64, w, f"gpus_per_instance={self.gpus_per_instance} must be in [1, 64]")
        # Accept strings and lists (admin API bodies, SQLite rows): store a tuple of Tier.
        try:
            tiers = tuple(Tier(t) for t in self.cache_tiers)
        except ValueError as e:
            raise SnapshotError(f"{w}: cache_tiers={list(self.cache_tiers)!r}: {e}") from None
        object.__setattr__(self, "cache_tiers", tiers)
        for t in tiers:
            require(t is not Tier.NONE, w, "cache_tiers cannot hold 'none'")
        require(len(set(self.cache_tiers)) == len(self.cache_tiers), w, f"cache_tiers has duplicates: {self.cache_tiers}")

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


__all__ = ["CACHE_TIERS", "SOURCE_TIERS", "DeploymentSpec", "InstanceState", "SnapshotError", "Tier"]
