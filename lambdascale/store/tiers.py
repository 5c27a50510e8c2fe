"""The per-node tiered store: SSD (block files), host pool, device (GPU) tier.

:class:`NodeStore` answers "where is model M on this node" (for the control snapshot) and moves
models between tiers with the pipelined loader, announcing each block as it lands. Every tier
keeps :class:`CacheState` and asks :func:`choose_evictions` for room, so a model in use (leased)
is never evicted and capacity is never over-committed: room is made *before* bytes move, and a
load that cannot fit raises :class:`StoreFullError` without evicting anything.

Thread safety: one lock per tier guards its bookkeeping; loads run outside the lock, holding a
lease on the model being filled so it cannot be evicted mid-load.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import torch

from lambdascale.clock import Clock, MonotonicClock
from lambdascale.errors import LambdaScaleError
from lambdascale.model.checkpoint import Checkpoint, find_model, tensors_from_block_bytes
from lambdascale.store.cache import CacheEntry, CacheState, choose_evictions
from lambdascale.store.loader import BlockLanded, LoadStats, OnBlock, Tier, copy_to_device, load_from_ssd
from lambdascale.store.pool import Allocation, HostPool, PoolFullError, RangeAllocator
from lambdascale.ratelimit import TokenBucket
from lambdascale.store.settings import StoreSettings

GB = 1_000_000_000


class StoreFullError(LambdaScaleError):
    """A tier cannot make room for a model (everything else is leased or inside keep-alive)."""


class BlockState(str, Enum):
    """State of one block of a resident model."""

    LOADING = "loading"
    READY = "ready"


@dataclass
class Resident:
    """A model held in one tier: per-block storage and readiness."""

    name: str
    checkpoint: Checkpoint
    tier: Tier
    buffers: dict[int, torch.Tensor]          # block -> uint8 bytes (pool view or device buffer)
    allocations: dict[int, Allocation]         # block -> byte range of the tier's allocator
    state: dict[int, BlockState] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.state) == self.checkpoint.manifest.n_blocks and all(
            s is BlockState.READY for s in self.state.values()
        )

    def ready_blocks(self) -> set[int]:
        return {b for b, s in self.state.items() if s is BlockState.READY}

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Zero-copy tensors of a ready block."""
        if self.state.get(b) is not BlockState.READY:
            raise LambdaScaleError(f"block {b} of {self.name} is not ready in the {self.tier.value} tier")
        return tensors_from_block_bytes(self.buffers[b], where=f"{self.name} block {b} ({self.tier.value})")


class MemoryTier:
    """A capacity-bounded tier (host pool or device memory) with LRU + keep-alive eviction."""

    def __init__(self, tier: Tier, allocator: RangeAllocator, keep_alive_s: float, strict_keep_alive: bool,
                 storage: Callable[[Allocation], torch.Tensor]) -> None:
        self.tier = tier
        self.allocator = allocator
        self.cache = CacheState(keep_alive_s)
        self.strict_keep_alive = strict_keep_alive
        self._storage = storage
        self.models: dict[str, Resident] = {}
        self.lock = threading.RLock()

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def entries(self) -> list[CacheEntry]:
        with self.lock:
            return self.cache.entries()

    def _evict_locked(self, name: str) -> None:
        self.cache.remove(name)  # raises if leased
        res = self.models.pop(name)
        for a in res.allocations.values():
            self.allocator.free(a)

    def evict(self, name: str) -> None:
        """Drop a model from this tier (refused while it is leased)."""
        with self.lock:
            if name not in self.models:
                raise LambdaScaleError(f"{name} is not in the {self.tier.value} tier")
            try:
                self._evict_locked(name)
            except ValueError as e:
                raise LambdaScaleError(str(e)) from None

    def reserve(self, ckpt: Checkpoint, now: float, keep_alive_s: float | None = None) -> Resident:
        """Make room (evicting per policy) and allocate every block of ``ckpt``; the new resident
        starts leased once (the caller's load holds it; release it with :meth:`release`)."""
        name = ckpt.name
        sizes = {b.index: b.nbytes for b in ckpt.manifest.blocks}
        need = sum(self.allocator.rounded(n) for n in sizes.values())
        with self.lock:
            if name in self.models:
                raise LambdaScaleError(f"{name} is already in the {self.tier.value} tier")
            if need > self.capacity:
                raise StoreFullError(f"{name} needs {need} bytes, more than the {self.tier.value} tier's capacity {self.capacity}")
            while True:
                decision = choose_evictions(self.cache.entries(), need, self.allocator.free_bytes, now, self.strict_keep_alive)
                if not decision.feasible:
                    raise StoreFullError(
                        f"{self.tier.value} tier cannot make room for {name} ({need} bytes): {self.allocator.free_bytes} free of "
                        f"{self.capacity}, the rest held by models in use or inside keep-alive"
                    )
                for key in decision.evict:
                    self._evict_locked(key)
                allocs: dict[int, Allocation] = {}
                try:
                    for b, n in sizes.items():
                        allocs[b] = self.allocator.alloc(n)
                    break
                except PoolFullError:  # enough bytes free but fragmented: give back and evict one more
                    for a in allocs.values():
                        self.allocator.free(a)
                    more = choose_evictions(self.cache.entries(), self.allocator.free_bytes + 1, self.allocator.free_bytes,
                                            now, self.strict_keep_alive)
                    if not more.feasible:
                        raise StoreFullError(
                            f"{self.tier.value} tier is too fragmented to place {name} ({need} bytes, "
                            f"largest free range {self.allocator.largest_free})"
                        ) from None
                    self._evict_locked(more.evict[0])
            res = Resident(name, ckpt, self.tier, {b: self._storage(a) for b, a in allocs.items()}, allocs,
                           {b: BlockState.LOADING for b in sizes})
            self.models[name] = res
            self.cache.add(name, need, now, keep_alive_s)
            self.cache.lease(name, now)
            return res

    def abandon(self, name: str) -> None:
        """Drop a model whose load failed (its lease is released first)."""
        with self.lock:
            if name in self.models:
                self.cache.release(name, self.cache.get(name).last_used)
                if self.cache.get(name).leases == 0:
                    self._evict_locked(name)

    def lease(self, name: str, now: float) -> None:
        with self.lock:
            if name not in self.models:
                raise LambdaScaleError(f"{name} is not in the {self.tier.value} tier")
            self.cache.lease(name, now)

    def release(self, name: str, now: float) -> None:
        with self.lock:
            self.cache.release(name, now)

    def mark_ready(self, name: str, b: int) -> None:
        with self.lock:
            self.models[name].state[b] = BlockState.READY


@dataclass(frozen=True)
class ModelHoldings:
    """Where one model is on this node (what the control snapshot needs)."""

    name: str
    tiers: frozenset[Tier]
    host_blocks: frozenset[int]
    gpu_blocks: frozenset[int]
    nbytes: int


class NodeStore:
    """The tiered store of one node: SSD (``models_dir``), host pool, optional device tier."""

    def __init__(self, models_dir: str | Path, settings: StoreSettings | None = None, clock: Clock | None = None,
                 device: str | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.settings = settings or StoreSettings()
        self.clock = clock or MonotonicClock()
        s = self.settings
        pinned = {"auto": None, "on": True, "off": False}[s.pinned]
        self.pool = HostPool(int(s.host_capacity_gb * GB), pinned=pinned, align=s.pool_align)
        self.host = MemoryTier(Tier.HOST, self.pool.allocator, s.keep_alive_s, s.strict_keep_alive, self.pool.tensor)
        if device is None:
            device = "cuda" if torch.cuda.is_available() and s.gpu_capacity_gb > 0 else None
        self.device = torch.device(device) if device is not None else None
        self.gpu: MemoryTier | None = None
        if self.device is not None:
            if s.gpu_capacity_gb <= 0:
                raise LambdaScaleError("a device tier needs store.gpu_capacity_gb > 0")
            dev = self.device

            def device_storage(a: Allocation) -> torch.Tensor:
                return torch.empty(a.nbytes, dtype=torch.uint8, device=dev)

            # Device memory is accounted by the same allocator (ranges are only bookkeeping there).
            self.gpu = MemoryTier(Tier.GPU, RangeAllocator(int(s.gpu_capacity_gb * GB), s.pool_align), s.keep_alive_s,
                                  s.strict_keep_alive, device_storage)
        self.ssd_rate = TokenBucket.from_gbps(s.ssd_gbps, clock=MonotonicClock()) if s.ssd_gbps else None
        self._locks_lock = threading.Lock()
        self._load_locks: dict[tuple[Tier, str], threading.Lock] = {}

    # ---- queries ---------------------------------------------------------------------------
    def checkpoint(self, name: str) -> Checkpoint:
        return find_model(self.models_dir, name)

    def holdings(self) -> dict[str, ModelHoldings]:
        """Per model: tiers holding it completely, and ready blocks in host and GPU."""
        from lambdascale.model.checkpoint import list_models

        out: dict[str, ModelHoldings] = {}
        names = {m.name for m in list_models(self.models_dir) if m.error is None}
        names |= set(self.host.models) | (set(self.gpu.models) if self.gpu else set())
        for name in sorted(names):
            tiers: set[Tier] = set()
            if (self.models_dir / name / "manifest.json").is_file():
                tiers.add(Tier.SSD)
            hb = self.host.models[name].ready_blocks() if name in self.host.models else set()
            if name in self.host.models and self.host.models[name].complete:
                tiers.add(Tier.HOST)
            gb: set[int] = set()
            if self.gpu is not None and name in self.gpu.models:
                gb = self.gpu.models[name].ready_blocks()
                if self.gpu.models[name].complete:
                    tiers.add(Tier.GPU)
            nbytes = 0
            for tier in (self.host, self.gpu):
                if tier is not None and name in tier.models:
                    nbytes = tier.models[name].checkpoint.manifest.total_bytes
            out[name] = ModelHoldings(name, frozenset(tiers), frozenset(hb), frozenset(gb), nbytes)
        return out

    def fastest_tier(self, name: str) -> Tier | None:
        h = self.holdings().get(name)
        if h is None or not h.tiers:
            return None
        return min(h.tiers, key=[Tier.GPU, Tier.HOST, Tier.SSD].index)

    # ---- leases ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, name: str, tier: Tier = Tier.HOST) -> Iterator[Resident]:
        """Hold ``name`` in ``tier`` for the duration (it cannot be evicted meanwhile)."""
        t = self._tier(tier)
        t.lease(name, self.clock.now())
        try:
            yield t.models[name]
        finally:
            t.release(name, self.clock.now())

    def _tier(self, tier: Tier) -> MemoryTier:
        if tier is Tier.HOST:
            return self.host
        if tier is Tier.GPU and self.gpu is not None:
            return self.gpu
        raise LambdaScaleError(f"this node has no {tier.value} memory tier")

    # ---- loads --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _one_load(self, tier: Tier, name: str) -> Iterator[None]:
        """Serialize loads of one model into one tier: a second caller waits for the first and then
        finds the model resident (or, if the first failed, tries again itself)."""
        with self._locks_lock:
            lock = self._load_locks.setdefault((tier, name), threading.Lock())
        with lock:
            yield

    def load_host(self, name: str, on_block: OnBlock | None = None, keep_alive_s: float | None = None) -> LoadStats:
        """Bring ``name`` into the host pool from SSD (no-op, announcing every block, if already there)."""
        with self._one_load(Tier.HOST, name):
            return self._load_host(name, on_block, keep_alive_s)

    def _load_host(self, name: str, on_block: OnBlock | None, keep_alive_s: float | None) -> LoadStats:
        now = self.clock.now()
        with self.host.lock:
            res = self.host.models.get(name)
            if res is not None and res.complete:
                self.host.cache.touch(name, now)
                if on_block is not None:
                    for b in sorted(res.buffers):
                        on_block(BlockLanded(name, b, Tier.HOST, res.tensors(b), res.buffers[b].numel(), 0.0))
                return LoadStats(name, Tier.HOST, tuple(sorted(res.buffers)), 0, 0.0)
        ckpt = self.checkpoint(name)
        res = self.host.reserve(ckpt, now, keep_alive_s)

        def landed(ev: BlockLanded) -> None:
            self.host.mark_ready(name, ev.block)
            if on_block is not None:
                on_block(ev)

        try:
            stats = load_from_ssd(ckpt, lambda b: self.pool.view_padded(res.allocations[b]), on_block=landed,
                                  rate=self.ssd_rate, io_threads=self.settings.loader_io_threads,
                                  direct=self.settings.direct_io)
        except BaseException:
            self.host.abandon(name)
            raise
        self.host.release(name, self.clock.now())
        return stats

    def load_gpu(self, name: str, on_block: OnBlock | None = None, keep_alive_s: float | None = None) -> LoadStats:
        """Bring ``name`` into the device tier (through the host pool, loading it from SSD first if needed)."""
        with self._one_load(Tier.GPU, name):
            return self._load_gpu(name, on_block, keep_alive_s)

    def _load_gpu(self, name: str, on_block: OnBlock | None, keep_alive_s: float | None) -> LoadStats:
        gpu = self._tier(Tier.GPU)
        now = self.clock.now()
        with gpu.lock:
            res = gpu.models.get(name)
            if res is not None and res.complete:
                gpu.cache.touch(name, now)
                if on_block is not None:
                    for b in sorted(res.buffers):
                        on_block(BlockLanded(name, b, Tier.GPU, res.tensors(b), res.buffers[b].numel(), 0.0))
                return LoadStats(name, Tier.GPU, tuple(sorted(res.buffers)), 0, 0.0)
        self.load_host(name)
        with self.lease(name, Tier.HOST) as host_res:
            dres = gpu.reserve(host_res.checkpoint, now, keep_alive_s)

            def landed(ev: BlockLanded) -> None:
                gpu.mark_ready(name, ev.block)
                if on_block is not None:
                    on_block(ev)

            try:
                _, stats = copy_to_device(name, sorted(host_res.buffers.items()), dres.buffers[0].device, on_block=landed,
                                          out=dict(dres.buffers))
            except BaseException:
                gpu.abandon(name)
                raise
        gpu.release(name, self.clock.now())
        return stats

    def load(self, name: str, tier: Tier = Tier.HOST, on_block: OnBlock | None = None) -> LoadStats:
        """Load ``name`` into ``tier`` from the fastest tier that holds it."""
        if tier is Tier.GPU:
            return self.load_gpu(name, on_block)
        if tier is Tier.HOST:
            return self.load_host(name, on_block)
        raise LambdaScaleError("models are loaded into host or gpu; the SSD tier is written by `lambdascale import`")

    async def stream(self, name: str, tier: Tier = Tier.HOST) -> AsyncIterator[BlockLanded]:
        """Async iterator over blocks as they land (the load runs in a worker thread)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[BlockLanded | BaseException | None] = asyncio.Queue()

        def run() -> None:
            try:
                def forward(ev: BlockLanded) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, ev)

                self.load(name, tier, on_block=forward)
                loop.call_soon_threadsafe(q.put_nowait, None)
            except BaseException as e:
                loop.call_soon_threadsafe(q.put_nowait, e)

        fut = loop.run_in_executor(None, run)
        try:
            while True:
                item = await q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await fut

