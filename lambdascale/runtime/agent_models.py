"""The agent's model buffers and their memory tiers: reading a model in, allocating landing
zones, eviction and copy-back (policy bookkeeping lives in :mod:`lambdascale.runtime.agent_memory`).

Buffers: ONE transport buffer per model holds the model's whole byte stream
(:mod:`lambdascale.runtime.model_state`); a block is a slice of it (:meth:`ModelBuffers.block_view`,
at the manifest's block offset). A read from the store or the agent's SSD copy verifies every
chunk's xxh64 against the manifest before it marks the chunk held. Making hundreds of MB resident
or re-verifying blocks takes seconds, so that work runs in worker threads and the agent's loop
keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import xxhash

from lambdascale.errors import LambdaScaleError
from lambdascale.model.checkpoint import read_exact_into
from lambdascale.model.manifest import Manifest, read_manifest
from lambdascale.ratelimit import TokenBucket, gbps_to_bytes_per_s
from lambdascale.runtime.agent_memory import GB, AgentMemory, MemoryRefusedError, MemTier, Residency
from lambdascale.runtime.arena import Arena
from lambdascale.runtime.messages import CopyBackModel, EvictModel, HoldingsReport, HoldModel
from lambdascale.runtime.model_state import ModelState
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.runtime.tags import buffer_name
from lambdascale.transfer.base import Transport
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger("lambdascale.agent")


class ModelBuffers:
    """Every model this node holds: its stream buffer, which chunks are held, and its tiers."""

    def __init__(self, node: int, transport: Transport, transfer: TransferSettings, runtime: RuntimeSettings) -> None:
        self.node = node
        self.transport = transport
        self.runtime = runtime
        self.models: dict[str, ModelState] = {}
        self.ssd_bucket = TokenBucket(
            gbps_to_bytes_per_s(transfer.ssd_gbps) if transfer.ssd_gbps else None, transfer.bucket_burst_bytes
        )
        ssd_dir = Path(runtime.agent_ssd_dir) / f"node{node}" if runtime.agent_ssd_dir else None
        self.memory = AgentMemory(node, int(runtime.host_capacity_gb * GB), ssd_dir,
                                  int(runtime.agent_ssd_capacity_gb * GB))
        self._copy_tasks: set[asyncio.Task] = set()
        self._arena: asyncio.Task[Arena] | None = None  # resident landing-zone memory (runtime.device_arena_gb)

    # ---- buffers ---------------------------------------------------------------------------
    def model(self, name: str) -> ModelState:
        try:
            return self.models[name]
        except KeyError:
            raise LambdaScaleError(f"node {self.node} holds no model {name!r} (has: {sorted(self.models)})") from None

    def block_view(self, model: str, block: int) -> memoryview:
        """The bytes of block ``block`` of ``model`` (the block file's bytes): its slice of the
        model's stream buffer, at the manifest's block offset."""
        st = self.model(model)
        blk = st.manifest.blocks[block]
        return self.stream_view(model)[blk.offset : blk.end]

    def stream_view(self, model: str) -> memoryview:
        """``model``'s whole byte stream in this agent's transport buffer."""
        return self.transport.buffer(buffer_name(model))

    def start_arena(self) -> None:
        """Make the landing-zone arena resident in a worker thread (while the agent registers)."""
        if self.runtime.device_arena_gb > 0:
            self._arena = asyncio.ensure_future(asyncio.to_thread(Arena, int(self.runtime.device_arena_gb * GB)))

    async def arena_ready(self) -> Arena | None:
        """The landing-zone arena once resident; None without one, or when it could not be made
        (then every model gets a fresh buffer, as without an arena)."""
        if self._arena is None:
            return None
        try:
            return await self._arena
        except (MemoryError, ValueError) as e:
            log.warning("node %d: no %.2f GB arena (%s); models get fresh buffers", self.node,
                        self.runtime.device_arena_gb, e)
            self._arena = None
            return None

    def arena_free_bytes(self) -> int | None:
        """Free bytes of the arena; None without one (or not made yet)."""
        a = self._arena
        return a.result().free_bytes if a is not None and a.done() and not a.exception() else None

    async def allocate(self, manifest: Manifest) -> ModelState:
        """The stream buffer for ``manifest`` (once per model).

        Making hundreds of MB resident takes seconds on a busy machine: it runs in a worker thread
        so this loop keeps heartbeating (else the controller declares a healthy node lost).
        """
        if manifest.name in self.models:
            return self.models[manifest.name]
        arena = await self.arena_ready()
        carved = arena.take(manifest.total_bytes) if arena is not None else None
        if carved is not None:  # resident already: no page to touch
            rng, arr = carved
        else:
            rng, arr = None, await asyncio.to_thread(Transport.allocate, manifest.total_bytes)
        if manifest.name in self.models:  # a concurrent request allocated it meanwhile
            if rng is not None and arena is not None:
                arena.give(rng)
            return self.models[manifest.name]
        self.transport.adopt(buffer_name(manifest.name), arr)
        st = self.models[manifest.name] = ModelState(manifest, arena_range=rng)
        return st

    def free(self, model: str) -> None:
        """Drop ``model``'s stream buffer (its arena range goes back to the arena)."""
        st = self.models.pop(model, None)
        if st is not None:
            self.transport.unregister(buffer_name(model))
            if st.arena_range is not None and self._arena is not None:
                self._arena.result().give(st.arena_range)

    # ---- reading a model in ----------------------------------------------------------------
    async def hold(self, msg: HoldModel) -> dict:
        """Read every block file into its buffer, verifying each chunk; label it ``msg.tier``.

        The host reservation is taken before any byte is read (refused when the tier is full). With
        ``reuse``, a model already complete in the buffers is not read again (a host- or gpu-tier hit); else
        the agent's own SSD copy is preferred over ``model_dir`` (the store).
        """
        manifest = read_manifest(msg.model_dir)
        r = self.memory.residency(manifest)
        new_host = msg.tier == "host" and not r.host
        if msg.tier == "host":
            self.memory.reserve_host(r)
        was = self.models.get(manifest.name)
        if msg.reuse and was is not None and len(was.held) == manifest.n_chunks and r.labelled and not r.holds:
            source = "host" if r.host_complete else "gpu"
            self._label_loaded(r, msg.tier)
            return {"peer": self.transport.info().model_dump(mode="json"), "held": sorted(was.held), "source": source}
        ssd = self.memory.ssd_path(manifest.name)
        r.holds += 1
        try:
            st = await self.read_blocks(manifest, ssd if ssd is not None else Path(msg.model_dir), msg.ssd_cap)
        except BaseException:
            if new_host and r.host_alloc is not None:
                self.memory.host.free(r.host_alloc)
                r.host_alloc = None
            raise
        finally:
            r.holds -= 1
        self._label_loaded(r, msg.tier)
        return {"peer": self.transport.info().model_dump(mode="json"), "held": sorted(st.held),
                "source": "ssd" if ssd is not None else "store"}

    def _label_loaded(self, r: Residency, tier: str) -> None:
        if tier == "host":
            r.host_blocks = set(range(r.manifest.n_blocks))
        else:
            r.gpu = True
        self.memory.touch(r.manifest.name, time.monotonic(), (MemTier(tier),))

    async def read_blocks(self, manifest: Manifest, src: Path, capped: bool = True) -> ModelState:
        """Fill the stream buffer from the block files chunk by chunk (a chunk may take its bytes
        from two files), verifying each chunk before it is marked held; ``capped`` paces the
        reads by the SSD token bucket."""
        st = await self.allocate(manifest)
        view = self.stream_view(manifest.name)
        fds: dict[int, int] = {}
        try:
            for blk in manifest.blocks:
                path = src / blk.file
                fd = fds[blk.index] = os.open(path, os.O_RDONLY)
                if os.fstat(fd).st_size != blk.nbytes:
                    raise LambdaScaleError(f"{path}: file size differs from the manifest's {blk.nbytes} bytes")
            for ch in manifest.chunks:
                if capped:
                    await self.ssd_bucket.acquire_async(ch.length)
                for b, off, ln in manifest.chunk_parts(ch.index):
                    s = manifest.blocks[b].offset + off
                    await asyncio.to_thread(read_exact_into, fds[b], view[s : s + ln], off, str(src / manifest.blocks[b].file))
                part = view[ch.offset : ch.end]
                if xxhash.xxh64(part).hexdigest() != ch.xxh64:
                    files = ", ".join(manifest.blocks[b].file for b in manifest.blocks_of_chunk(ch.index))
                    raise LambdaScaleError(f"{src}: chunk {ch.index} ({files}) fails its xxh64 check")
                st.mark_held(ch.index)
        finally:
            for fd in fds.values():
                os.close(fd)
        return st

    # ---- memory tiers (runtime.agent_memory) -------------------------------------------------
    def receiving(self, model: str) -> bool:
        st = self.models.get(model)
        return st is not None and len(st.held) < st.manifest.n_chunks

    def holdings(self, sending: set[str]) -> HoldingsReport:
        """This node's tiers now, ``sending`` naming the models with send lists still running
        (see :class:`~lambdascale.runtime.messages.HoldingsReport`)."""
        data = self.memory.report(
            time.monotonic(), {n: s.held for n, s in self.models.items()},
            {n for n in self.models if self.receiving(n)}, sending)
        return HoldingsReport.model_validate(data)

    def evict(self, msg: EvictModel, sending: bool) -> bool:
        """Drop ``msg.model`` from ``msg.tier`` (refused while in use); whether it was evicted."""
        evicted, free = self.memory.evict(msg.model, MemTier(msg.tier), self.receiving(msg.model), sending)
        if free:
            self.free(msg.model)
        return evicted

    def copy_back(self, msg: CopyBackModel) -> bool:
        """Start copying a complete in-memory model to ``msg.to_tier``; whether a copy started."""
        st = self.models.get(msg.model)
        r = self.memory.models.get(msg.model)
        if st is None or r is None or len(st.held) < st.manifest.n_chunks or not r.labelled:
            raise MemoryRefusedError(f"node {self.node}: no complete copy of {msg.model!r} in memory to copy back")
        if msg.to_tier == "host" and not r.host:
            self.memory.reserve_host(r)
            self._spawn_copy(r, self._verify_into_host(r))
            return True
        if msg.to_tier == "ssd" and r.ssd_alloc is None:
            self.memory.reserve_ssd(r)
            self._spawn_copy(r, self._persist_ssd(r))
            return True
        return False

    def _spawn_copy(self, r: Residency, coro: Coroutine[Any, Any, None]) -> None:
        r.copies += 1
        task = asyncio.get_running_loop().create_task(coro)
        self._copy_tasks.add(task)

        def done(t: asyncio.Task) -> None:
            r.copies -= 1
            self._copy_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:  # reservation already released
                print(f"agent {self.node}: copy-back of {r.manifest.name} failed: {t.exception()}", file=sys.stderr)

        task.add_done_callback(done)

    async def _verify_into_host(self, r: Residency) -> None:
        """Copy-back gpu -> host: the buffers become a host copy once each block re-verifies (worker thread)."""
        m = r.manifest
        try:
            view = self.stream_view(m.name)
            for blk in m.blocks:
                await asyncio.to_thread(self.memory.verify_block, m, blk.index, view)
                r.host_blocks.add(blk.index)
            self.memory.touch(m.name, time.monotonic(), (MemTier.HOST,))
        except BaseException:
            if r.host_alloc is not None:
                self.memory.host.free(r.host_alloc)
            r.host_alloc, r.host_blocks = None, set()
            raise

    async def _persist_ssd(self, r: Residency) -> None:
        """Copy-back -> ssd: block files + manifest into the agent's SSD dir (worker thread)."""
        m = r.manifest
        try:
            view = self.stream_view(m.name)
            await asyncio.to_thread(self.memory.write_ssd, m, view)
            r.ssd_complete = True
            self.memory.touch(m.name, time.monotonic(), (MemTier.SSD,))
        except BaseException:
            if r.ssd_alloc is not None and self.memory.ssd is not None:
                self.memory.ssd.free(r.ssd_alloc)
            r.ssd_alloc, r.ssd_complete = None, False
            raise

    def cancel_copies(self) -> None:
        for t in list(self._copy_tasks):
            t.cancel()
