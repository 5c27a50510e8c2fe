"""Node agent: one process per node; owns its model buffers (host tier) and its transport endpoint.

The agent dials the controller at the address its launcher gives, registers (node id, pid,
transport address), sends heartbeats and answers typed control messages
(:mod:`lambdascale.runtime.messages`).

Buffers: ONE transport buffer per model holds the model's whole byte stream (its block files
concatenated in block order, format version 2). Chunks are byte ranges of that stream and may
span two blocks, so a send or an arrival is one range of one buffer; a block is a slice of it
(:meth:`NodeAgent.block_view`, at the manifest's block offset), usable once every chunk
overlapping it is held (:meth:`ModelState.missing_for_blocks`). Weights move only over the transport: a receiver verifies
every arriving chunk's xxh64 against the manifest before it marks the chunk held, and only held
chunks are ever forwarded (:class:`SendChunks` lists wait per chunk, so forwarding is chunk-level,
not round-level).

Dying with the launcher: the agent exits when its control connection closes, when its parent
process changes (checked every heartbeat) and, on Linux, through ``PR_SET_PDEATHSIG`` = SIGKILL
set at start-up, so a hard kill of the controller leaves no orphan.

Run as ``python -m lambdascale.runtime.agent --controller HOST:PORT --node N``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from lambdascale.errors import LambdaScaleError, TransferError
from lambdascale.model.checkpoint import read_exact_into
from lambdascale.model.manifest import Manifest, read_manifest
from lambdascale.runtime.messages import (
    PACE,
    CancelSends,
    ChunkCorrupt,
    CopyBackModel,
    EvictModel,
    GetHoldings,
    HoldingsReport,
    ChunkHeld,
    ControlError,
    CorruptNext,
    DissolveStage,
    DropModel,
    ExportKv,
    FormStage,
    ImportKv,
    RegisterBuffer,
    SendBuffer,
    GetStatus,
    Heartbeat,
    HoldModel,
    PrepareReceive,
    Register,
    Reply,
    SendChunks,
    SendFailed,
    SetPeers,
    Shutdown,
    StageStep,
    Warmup,
    read_msg,
    write_msg,
)
from lambdascale.runtime.agent_memory import GB, AgentMemory, MemoryRefusedError, MemTier
from lambdascale.runtime.arena import Arena
from lambdascale.runtime.device import Device
from lambdascale.store.pool import Allocation
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.base import Arrival, Transport
from lambdascale.transfer.factory import make_transport
from lambdascale.ratelimit import TokenBucket, gbps_to_bytes_per_s
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger("lambdascale.agent")

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def buffer_name(model: str) -> str:
    """Transport buffer holding ``model``'s whole byte stream (same name on every node)."""
    return f"{model}/stream"


def chunk_tag(model: str, chunk: int) -> str:
    return f"{model}|{chunk}"


def parse_tag(tag: str) -> tuple[str, int]:
    model, _, c = tag.rpartition("|")
    return model, int(c)


@dataclass
class ModelState:
    """One model on this node: its manifest and which chunks are held (verified)."""

    manifest: Manifest
    held: set[int] = field(default_factory=set)
    events: dict[int, asyncio.Event] = field(default_factory=dict)
    arena_range: Allocation | None = None  # its stream buffer's range of the agent's arena, if there

    def event(self, chunk: int) -> asyncio.Event:
        ev = self.events.get(chunk)
        if ev is None:
            ev = self.events[chunk] = asyncio.Event()
            if chunk in self.held:
                ev.set()
        return ev

    def mark_held(self, chunk: int) -> None:
        self.held.add(chunk)
        self.event(chunk).set()

    def missing_for_blocks(self, b0: int, b1: int) -> list[int]:
        """Chunks not yet held (verified) that blocks ``[b0, b1)`` need before a stage can use them
        (every chunk overlapping them, by the manifest's layout)."""
        return self.manifest.layout.missing_for_blocks(b0, b1, self.held)


class NodeAgent:
    """The agent's state and message handlers; :meth:`run` is its whole life."""

    def __init__(
        self,
        node: int,
        controller: tuple[str, int],
        transfer: TransferSettings,
        runtime: RuntimeSettings,
        parent_pid: int | None = None,
    ) -> None:
        self.node = node
        self.controller = controller
        self.transfer_settings = transfer
        self.runtime = runtime
        self.parent_pid = parent_pid
        self.transport: Transport = make_transport(transfer.backend, node, transfer)
        self.models: dict[str, ModelState] = {}
        self.ssd_bucket = TokenBucket(
            gbps_to_bytes_per_s(transfer.ssd_gbps) if transfer.ssd_gbps else None, transfer.bucket_burst_bytes
        )
        # model -> (multicast run, epoch, task) of its send lists; (model, run) -> last cancelled epoch
        self._send_tasks: dict[str, list[tuple[int, int, asyncio.Task]]] = {}
        self._cancelled_epoch: dict[tuple[str, int], int] = {}
        self.stages: dict[tuple[str, int], Any] = {}  # (pipeline, stage index) -> StageHost (torch imported lazily)
        # the node's one accelerator: steps of all its stages and instances run one at a time, so
        # two stages here (non-adjacent stages of a pipeline; a pipeline stage beside a solo
        # instance) never overlap their compute; cross-node stages go first (runtime.device)
        self.device = Device()
        #: (start, end, pipeline, stage) of the latest device steps, monotonic seconds (GetStatus)
        self.device_steps: deque[tuple[float, float, str, int]] = deque(maxlen=512)
        self._hidden: dict[str, asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        ssd_dir = Path(runtime.agent_ssd_dir) / f"node{node}" if runtime.agent_ssd_dir else None
        self.memory = AgentMemory(node, int(runtime.host_capacity_gb * GB), ssd_dir,
                                  int(runtime.agent_ssd_capacity_gb * GB))
        self._pipe_model: dict[str, str] = {}  # pipeline -> model of its stages here
        self._copy_tasks: set[asyncio.Task] = set()
        self._arena: asyncio.Task[Arena] | None = None  # resident landing-zone memory (runtime.device_arena_gb)

    # ---- plumbing --------------------------------------------------------------------------
    async def _report(self, msg) -> None:
        assert self._writer is not None
        async with self._write_lock:
            await write_msg(self._writer, msg)

    def _model(self, name: str) -> ModelState:
        try:
            return self.models[name]
        except KeyError:
            raise LambdaScaleError(f"node {self.node} holds no model {name!r} (has: {sorted(self.models)})") from None

    def block_view(self, model: str, block: int) -> memoryview:
        """The bytes of block ``block`` of ``model`` (the block file's bytes): its slice of the
        model's stream buffer, at the manifest's block offset."""
        st = self._model(model)
        blk = st.manifest.blocks[block]
        return self.stream_view(model)[blk.offset : blk.end]

    def stream_view(self, model: str) -> memoryview:
        """``model``'s whole byte stream in this agent's transport buffer."""
        return self.transport.buffer(buffer_name(model))

    async def _allocate(self, manifest: Manifest) -> ModelState:
        """The stream buffer for ``manifest`` (once per model).

        Making hundreds of MB resident takes seconds on a busy machine: it runs in a worker thread
        so this loop keeps heartbeating (else the controller declares a healthy node lost).
        """
        if manifest.name in self.models:
            return self.models[manifest.name]
        arena = await self._arena_ready()
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

    async def _arena_ready(self) -> Arena | None:
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

    # ---- handlers --------------------------------------------------------------------------
    async def _hold_model(self, msg: HoldModel) -> dict:
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
            st = await self._read_blocks(manifest, ssd if ssd is not None else Path(msg.model_dir), msg.ssd_cap)
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

    def _label_loaded(self, r: Any, tier: str) -> None:
        if tier == "host":
            r.host_blocks = set(range(r.manifest.n_blocks))
        else:
            r.gpu = True
        self.memory.touch(r.manifest.name, time.monotonic(), (MemTier(tier),))

    async def _read_blocks(self, manifest: Manifest, src: Path, capped: bool = True) -> ModelState:
        """Fill the stream buffer from the block files chunk by chunk (a chunk may take its bytes
        from two files), verifying each chunk before it is marked held; ``capped`` paces the
        reads by the SSD token bucket."""
        st = await self._allocate(manifest)
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
    def _receiving(self, model: str) -> bool:
        st = self.models.get(model)
        return st is not None and len(st.held) < st.manifest.n_chunks

    def _sending(self, model: str) -> bool:
        return any(not t.done() for _, _, t in self._send_tasks.get(model, []))

    def holdings(self) -> HoldingsReport:
        """This node's tiers now (see :class:`~lambdascale.runtime.messages.HoldingsReport`)."""
        data = self.memory.report(
            time.monotonic(), {n: s.held for n, s in self.models.items()},
            {n for n in self.models if self._receiving(n)}, {n for n in self._send_tasks if self._sending(n)})
        return HoldingsReport.model_validate(data)

    def _free_buffers(self, model: str) -> None:
        st = self.models.pop(model, None)
        if st is not None:
            self.transport.unregister(buffer_name(model))
            if st.arena_range is not None and self._arena is not None:
                self._arena.result().give(st.arena_range)

    def _evict(self, msg: EvictModel) -> dict:
        evicted, free = self.memory.evict(msg.model, MemTier(msg.tier), self._receiving(msg.model),
                                          self._sending(msg.model))
        if free:
            self._free_buffers(msg.model)
        return {"evicted": evicted, "report": self.holdings().model_dump(mode="json")}

    def _copy_back(self, msg: CopyBackModel) -> dict:
        st = self.models.get(msg.model)
        r = self.memory.models.get(msg.model)
        if st is None or r is None or len(st.held) < st.manifest.n_chunks or not r.labelled:
            raise MemoryRefusedError(f"node {self.node}: no complete copy of {msg.model!r} in memory to copy back")
        started = False
        if msg.to_tier == "host" and not r.host:
            self.memory.reserve_host(r)
            started = True
            self._spawn_copy(r, self._verify_into_host(r))
        elif msg.to_tier == "ssd" and r.ssd_alloc is None:
            self.memory.reserve_ssd(r)
            started = True
            self._spawn_copy(r, self._persist_ssd(r))
        return {"started": started, "report": self.holdings().model_dump(mode="json")}

    def _spawn_copy(self, r: Any, coro: Any) -> None:
        r.copies += 1
        task = asyncio.get_running_loop().create_task(coro)
        self._copy_tasks.add(task)

        def done(t: asyncio.Task) -> None:
            r.copies -= 1
            self._copy_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:  # reservation already released
                print(f"agent {self.node}: copy-back of {r.manifest.name} failed: {t.exception()}", file=sys.stderr)

        task.add_done_callback(done)

    async def _verify_into_host(self, r: Any) -> None:
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

    async def _persist_ssd(self, r: Any) -> None:
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

    async def _run_sends(self, model: str, sends: list[tuple[int, int]], epoch: int, run: int = 0) -> None:
        st = self._model(model)
        for chunk, dst in sends:
            # The flag, not only Task.cancel(): on Python 3.11 asyncio.wait_for can swallow a
            # cancellation that races with completion, and the list would run on.
            if epoch <= self._cancelled_epoch.get((model, run), -1):
                return
            await st.event(chunk).wait()
            if epoch <= self._cancelled_epoch.get((model, run), -1):
                return
            if dst == PACE:  # pacing entry: only wait until this node holds the chunk
                continue
            ch = st.manifest.chunk(chunk)
            try:
                await self.transport.send(dst, buffer_name(model), ch.offset, ch.length, chunk_tag(model, chunk))
            except TransferError as e:
                await self._report(SendFailed(node=self.node, model=model, chunk=chunk, dst=dst, epoch=epoch,
                                              error=str(e), run=run))

    def _hidden_future(self, tag: str) -> asyncio.Future[None]:
        fut = self._hidden.get(tag)
        if fut is None:
            fut = self._hidden[tag] = asyncio.get_running_loop().create_future()
        return fut

    async def _on_arrival(self, arr: Arrival) -> None:
        if arr.tag.startswith("h|"):  # hidden states for a pipeline stage (see stage_host)
            fut = self._hidden_future(arr.tag)
            if not fut.done():
                fut.set_result(None)
            return
        if arr.tag.startswith("kv|"):  # shipped KV: the controller sequences it (SendBuffer's reply)
            return
        model, chunk = parse_tag(arr.tag)
        st = self.models.get(model)
        if st is None:
            return
        ch = st.manifest.chunk(chunk)
        if arr.name != buffer_name(model) or (arr.offset, arr.length) != (ch.offset, ch.length):
            await self._report(ChunkCorrupt(node=self.node, model=model, chunk=chunk, src=arr.src,
                                            detail=f"{arr.name} range [{arr.offset}, +{arr.length}) is not chunk {chunk}'s"))
            return
        view = self.transport.buffer(arr.name)[arr.offset : arr.offset + arr.length]
        got = xxhash.xxh64(view).hexdigest()
        if got != ch.xxh64:
            await self._report(ChunkCorrupt(node=self.node, model=model, chunk=chunk, src=arr.src,
                                            detail=f"xxh64 {got} != manifest {ch.xxh64}"))
            return
        st.mark_held(chunk)
        await self._report(ChunkHeld(node=self.node, model=model, chunk=chunk, src=arr.src))

    def _stage(self, pipeline: str, index: int) -> Any:
        host = self.stages.get((pipeline, index))
        if host is None:
            raise LambdaScaleError(f"node {self.node} hosts no stage {index} of pipeline {pipeline!r}")
        return host

    async def _handle(self, msg) -> dict:
        if isinstance(msg, SetPeers):
            for p in msg.peers:
                if p.node != self.node:
                    self.transport.add_peer(p)
            return {}
        if isinstance(msg, HoldModel):
            return await self._hold_model(msg)
        if isinstance(msg, PrepareReceive):
            manifest = Manifest.model_validate(msg.manifest)
            self.memory.residency(manifest).gpu = True  # landing zone of an instance (the device copy)
            st = await self._allocate(manifest)
            return {"peer": self.transport.info().model_dump(mode="json"), "held": sorted(st.held)}
        if isinstance(msg, SendChunks):
            self._model(msg.model)
            task = asyncio.get_running_loop().create_task(self._run_sends(msg.model, msg.sends, msg.epoch, msg.run))
            self._send_tasks.setdefault(msg.model, []).append((msg.run, msg.epoch, task))
            return {}
        if isinstance(msg, CancelSends):  # one multicast's lists; another multicast of the model runs on
            keep = []
            stopping = []
            key = (msg.model, msg.run)
            self._cancelled_epoch[key] = max(msg.epoch, self._cancelled_epoch.get(key, -1))
            for run, ep, t in self._send_tasks.get(msg.model, []):
                if run == msg.run and ep <= msg.epoch:
                    t.cancel()
                    stopping.append(t)
                elif not t.done():
                    keep.append((run, ep, t))
            if stopping:
                await asyncio.wait(stopping, timeout=self.transfer_settings.stall_timeout_s)
            self._send_tasks[msg.model] = keep
            state = self.models.get(msg.model)
            return {"held": sorted(state.held) if state else []}
        if isinstance(msg, GetStatus):
            return {
                "node": self.node,
                "pid": os.getpid(),
                "models": {n: sorted(s.held) for n, s in self.models.items()},
                # xxh64 of every block's slice of the stream: lets a test compare a node's bytes with the files
                "block_digests": {
                    n: [xxhash.xxh64(self.block_view(n, b.index)).hexdigest() for b in s.manifest.blocks]
                    for n, s in self.models.items()
                },
                "device_steps": list(self.device_steps),
                "device_preemptions": self.device.preemptions,
                "switch_interval_ms": sys.getswitchinterval() * 1e3,
                "bytes_sent": self.transport.bytes_sent,
                "bytes_received": self.transport.bytes_received,
                # landing-zone arena (runtime.device_arena_gb): None without one (or not made yet)
                "arena_free_bytes": (self._arena.result().free_bytes
                                     if self._arena is not None and self._arena.done() and not self._arena.exception()
                                     else None),
            }
        if isinstance(msg, DropModel):
            self.memory.forget(msg.model)
            self._free_buffers(msg.model)
            return {}
        if isinstance(msg, GetHoldings):
            return {"report": self.holdings().model_dump(mode="json")}
        if isinstance(msg, EvictModel):
            return self._evict(msg)
        if isinstance(msg, CopyBackModel):
            return self._copy_back(msg)
        if isinstance(msg, CorruptNext):
            self.transport.corrupt_tags.add(chunk_tag(msg.model, msg.chunk))
            return {}
        if isinstance(msg, FormStage):
            # torch loads in a worker thread: the loop must keep heartbeating meanwhile
            mod = await asyncio.to_thread(importlib.import_module, "lambdascale.runtime.stage_host")
            StageHost = mod.StageHost
            key = (msg.pipeline, msg.index)
            if key in self.stages:
                raise LambdaScaleError(f"node {self.node} already hosts stage {msg.index} of pipeline {msg.pipeline!r}")
            self.stages[key] = await asyncio.to_thread(StageHost, self, self._model(msg.model), msg)
            r = self.memory.residency(self.models[msg.model].manifest)
            r.gpu = True  # a stage built from the buffers: the model's device copy
            r.stages.add(msg.pipeline)
            self._pipe_model[msg.pipeline] = msg.model
            self.memory.touch(msg.model, time.monotonic())
            return {"peer": self.transport.info().model_dump(mode="json")}
        if isinstance(msg, StageStep):
            from lambdascale.runtime.stage_host import hidden_tag

            host = self.stages.get((msg.pipeline, msg.index))
            if host is None:
                raise LambdaScaleError(f"node {self.node} hosts no stage {msg.index} of pipeline {msg.pipeline!r}")
            tag = hidden_tag(msg.pipeline, msg.step, msg.index)
            self.memory.touch(self._pipe_model.get(msg.pipeline, ""), time.monotonic())
            ready = None if host.stage.first or not msg.seqs else self._hidden_future(tag)
            # with k steps in flight this step's input may queue behind k - 1 others upstream
            wait_s = self.transfer_settings.stall_timeout_s * host.slots
            try:
                if ready is not None:
                    await asyncio.wait_for(asyncio.shield(ready), wait_s)
                return await host.step(msg, ready)
            except asyncio.TimeoutError:
                raise LambdaScaleError(
                    f"node {self.node}: no hidden states for pipeline {msg.pipeline!r} step {msg.step} "
                    f"within {wait_s:g}s"
                ) from None
            finally:
                self._hidden.pop(tag, None)
        if isinstance(msg, DissolveStage):
            for key in [k for k in self.stages if k[0] == msg.pipeline]:
                self.stages.pop(key).close()
            model = self._pipe_model.pop(msg.pipeline, None)
            owner = self.memory.models.get(model) if model is not None else None
            if owner is not None:
                owner.stages.discard(msg.pipeline)
            return {"peer": self.transport.info().model_dump(mode="json")}
        if isinstance(msg, Warmup):
            await asyncio.to_thread(importlib.import_module, "lambdascale.runtime.stage_host")
            arena = await self._arena_ready()  # resident before any scale-out is timed
            return {"arena_bytes": arena.size if arena is not None else 0}
        if isinstance(msg, ExportKv):
            host = self._stage(msg.pipeline, msg.index)
            return await asyncio.to_thread(host.export_kv, msg.seqs, msg.buffer)
        if isinstance(msg, RegisterBuffer):
            if not self.transport.has_buffer(msg.buffer):
                self.transport.register(msg.buffer, msg.nbytes)
            return {"peer": self.transport.info().model_dump(mode="json")}
        if isinstance(msg, SendBuffer):
            n = len(self.transport.buffer(msg.buffer))
            await self.transport.send(msg.dst, msg.buffer, 0, n, f"kv|{msg.buffer}")
            self.transport.unregister(msg.buffer)
            return {"nbytes": n}
        if isinstance(msg, ImportKv):
            host = self._stage(msg.pipeline, msg.index)
            await asyncio.to_thread(host.import_kv, msg.seqs, msg.parts, msg.dtype)
            for name, _ in msg.parts:
                self.transport.unregister(name)
            return {}
        if isinstance(msg, Shutdown):
            self._stop.set()
            return {}
        raise ControlError(f"node {self.node}: unexpected message {type(msg).__name__}")

    async def _serve_request(self, msg) -> None:
        try:
            data = await self._handle(msg)
            reply = Reply(req=msg.req, data=data)
        except (LambdaScaleError, OSError, ValueError, RuntimeError) as e:
            reply = Reply(req=msg.req, ok=False, error=f"node {self.node}: {e}")
        await self._report(reply)

    # ---- loops -----------------------------------------------------------------------------
    async def _control_loop(self, reader: asyncio.StreamReader) -> None:
        tasks: set[asyncio.Task] = set()
        while True:
            msg = await read_msg(reader)
            if msg is None:
                return  # controller gone: die with it
            t = asyncio.get_running_loop().create_task(self._serve_request(msg))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    async def _arrival_loop(self) -> None:
        while True:
            await self._on_arrival(await self.transport.arrivals.get())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.runtime.heartbeat_s)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                return  # launcher gone (re-parented): die with it
            await self._report(Heartbeat(node=self.node))

    async def run(self) -> None:
        if self.runtime.device_arena_gb > 0:  # made resident in a worker thread while we register
            self._arena = asyncio.ensure_future(asyncio.to_thread(Arena, int(self.runtime.device_arena_gb * GB)))
        await self.transport.start()
        host, port = self.controller
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), self.transfer_settings.connect_timeout_s
        )
        self._writer = writer
        await self._report(Register(node=self.node, pid=os.getpid(), peer=self.transport.info()))
        loops = [
            asyncio.ensure_future(self._control_loop(reader)),
            asyncio.ensure_future(self._arrival_loop()),
            asyncio.ensure_future(self._heartbeat_loop()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in loops:
                t.cancel()
            for lst in self._send_tasks.values():
                for _, _, t in lst:
                    t.cancel()
            for t in list(self._copy_tasks):
                t.cancel()
            await self.transport.close()
            writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lambdascale-agent", description="node agent (started by a launcher)")
    p.add_argument("--controller", required=True, help="HOST:PORT of the controller")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--transfer-json", default="{}", help="TransferSettings as JSON")
    p.add_argument("--runtime-json", default="{}", help="RuntimeSettings as JSON")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when the parent is no longer this pid")
    args = p.parse_args(argv)
    set_parent_death_signal()
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 1  # the launcher died before we armed the death signal
    host, _, port = args.controller.rpartition(":")
    runtime = RuntimeSettings.model_validate(json.loads(args.runtime_json))
    # the engine thread (stage steps) and the event loop (sends, control) share one interpreter lock
    sys.setswitchinterval(runtime.agent_switch_interval_ms / 1e3)
    agent = NodeAgent(
        args.node,
        (host, int(port)),
        TransferSettings.model_validate(json.loads(args.transfer_json)),
        runtime,
        parent_pid=args.parent_pid,
    )
    try:
        asyncio.run(agent.run())
    except (ConnectionError, OSError, asyncio.TimeoutError) as e:
        print(f"agent {args.node}: control channel to {args.controller} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
