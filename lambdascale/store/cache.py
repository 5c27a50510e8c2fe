"""Cache policy state of one memory tier: LRU with per-model keep-alive, leases, eviction choice.

:func:`choose_evictions` is a pure function of (entries, bytes needed, bytes free, now): models
leased by a runner are never chosen; models idle past their keep-alive go first, least recently
used first; then (unless ``strict_keep_alive``) models still inside their keep-alive, again LRU.
It returns nothing when even evicting every candidate could not make room, so a caller never
evicts for a load that cannot happen. :class:`CacheState` is the mutable bookkeeping around it
(last use, leases) that a tier keeps; it takes ``now`` from its caller, never the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class CacheEntry:
    """A model resident in a tier, as the eviction policy sees it."""

    key: str
    nbytes: int
    last_used: float
    keep_alive_s: float
    leases: int = 0

    def expired(self, now: float) -> bool:
        return now - self.last_used >= self.keep_alive_s


@dataclass(frozen=True)
class EvictionDecision:
    """Models to evict (in order) and whether that makes room for the request."""

    evict: tuple[str, ...]
    feasible: bool
    freed: int


def eviction_order(entries: Iterable[CacheEntry], now: float, strict_keep_alive: bool = False) -> list[CacheEntry]:
    """Candidates in the order they should go: expired LRU first, then (if allowed) unexpired LRU."""
    free = [e for e in entries if e.leases == 0]
    expired = sorted((e for e in free if e.expired(now)), key=lambda e: (e.last_used, e.key))
    if strict_keep_alive:
        return expired
    alive = sorted((e for e in free if not e.expired(now)), key=lambda e: (e.last_used, e.key))
    return expired + alive


def choose_evictions(
    entries: Sequence[CacheEntry], need_bytes: int, free_bytes: int, now: float, strict_keep_alive: bool = False
) -> EvictionDecision:
    """The fewest models, in policy order, whose eviction frees ``need_bytes`` (given ``free_bytes``)."""
    if need_bytes <= free_bytes:
        return EvictionDecision((), True, 0)
    chosen: list[str] = []
    freed = 0
    for e in eviction_order(entries, now, strict_keep_alive):
        chosen.append(e.key)
        freed += e.nbytes
        if free_bytes + freed >= need_bytes:
            return EvictionDecision(tuple(chosen), True, freed)
    return EvictionDecision((), False, 0)


class CacheState:
    """Last-use times, keep-alives and leases of the models in one tier."""

    def __init__(self, default_keep_alive_s: float) -> None:
        self.default_keep_alive_s = default_keep_alive_s
        self._entries: dict[str, CacheEntry] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    def get(self, key: str) -> CacheEntry:
        return self._entries[key]

    def add(self, key: str, nbytes: int, now: float, keep_alive_s: float | None = None) -> None:
        if key in self._entries:
            raise ValueError(f"{key} is already resident")
        ka = self.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        self._entries[key] = CacheEntry(key, nbytes, now, ka, 0)

    def remove(self, key: str) -> CacheEntry:
        e = self._entries[key]
        if e.leases:
            raise ValueError(f"{key} is leased ({e.leases} lease(s)); a model in use is never evicted")
        return self._entries.pop(key)

    def touch(self, key: str, now: float) -> None:
        e = self._entries[key]
        self._entries[key] = CacheEntry(e.key, e.nbytes, max(now, e.last_used), e.keep_alive_s, e.leases)

    def set_keep_alive(self, key: str, keep_alive_s: float) -> None:
        e = self._entries[key]
        self._entries[key] = CacheEntry(e.key, e.nbytes, e.last_used, keep_alive_s, e.leases)

    def lease(self, key: str, now: float) -> None:
        e = self._entries[key]
        self._entries[key] = CacheEntry(e.key, e.nbytes, max(now, e.last_used), e.keep_alive_s, e.leases + 1)

    def release(self, key: str, now: float) -> None:
        e = self._entries[key]
        if e.leases <= 0:
            raise ValueError(f"{key} has no lease to release")
        self._entries[key] = CacheEntry(e.key, e.nbytes, max(now, e.last_used), e.keep_alive_s, e.leases - 1)
