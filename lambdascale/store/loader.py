"""The chunked, pipelined loader: SSD -> host pool, host pool -> device.

SSD -> host: a reader thread ``pread``s chunk i+1 straight into the block's place in the host
pool while the calling thread verifies chunk i's xxh64 (reads release the GIL, so they overlap
with hashing); at most ``queue_depth`` chunks are read ahead. A block is announced (callback)
only after every one of its chunks verified, so a chunk whose hash does not match is never used:
the load stops with :class:`CheckpointError` naming the file and chunk, and the block stays
un-announced. An optional :class:`TokenBucket` caps the read rate (emulated NVMe).

Host -> device: each block is copied chunk by chunk into one device buffer; on CUDA the copies
are queued on a side stream from pinned memory and block b is announced when its event fires,
so block b computes while later blocks are still copying (execute-while-load). On CPU the copy
is a plain memcpy into fresh memory.

Announced tensors are zero-copy views (``tensors_from_block_bytes``) over the pool or the device
buffer: their shapes are those of the checkpoint (weights [out_features, in_features]).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch

from lambdascale.errors import CheckpointError
from lambdascale.model.checkpoint import Checkpoint, read_exact_into, tensors_from_block_bytes, verify_chunk
from lambdascale.store.ratelimit import TokenBucket


class Tier(str, Enum):
    """Memory tiers of a node, fastest first."""

    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"


@dataclass(frozen=True)
class BlockLanded:
    """Block ``block`` of ``model`` is verified and usable in ``tier`` (tensors share its memory)."""

    model: str
    block: int
    tier: Tier
    tensors: dict[str, torch.Tensor]
    nbytes: int
    seconds: float  # since the load started


OnBlock = Callable[[BlockLanded], None]


@dataclass(frozen=True)
class LoadStats:
    """What a load moved and how long it took."""

    model: str
    tier: Tier
    blocks: tuple[int, ...]
    nbytes: int
    seconds: float
    waited_on_rate_s: float = 0.0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


_DONE = object()


def load_from_ssd(
    ckpt: Checkpoint,
    dest: Callable[[int], memoryview],
    blocks: Sequence[int] | None = None,
    on_block: OnBlock | None = None,
    tensors_of: Callable[[int], dict[str, torch.Tensor]] | None = None,
    rate: TokenBucket | None = None,
    queue_depth: int = 4,
    verify: bool = True,
) -> LoadStats:
    """Read ``blocks`` (default all, in order) of ``ckpt`` into ``dest(b)`` (a memoryview of exactly
    the block's size), verifying every chunk, announcing each block once all its chunks verified.

    ``tensors_of(b)`` builds the announced tensors (default: parse ``dest(b)`` in place).
    """
    m = ckpt.manifest
    order = list(range(m.n_blocks)) if blocks is None else list(blocks)
    for b in order:
        if not 0 <= b < m.n_blocks:
            raise CheckpointError(f"{ckpt.dir}: block {b} out of range (model has {m.n_blocks} blocks)")
    views = {b: dest(b) for b in order}
    for b in order:
        if len(views[b]) != m.blocks[b].nbytes:
            raise ValueError(f"destination of block {b} holds {len(views[b])} bytes, the block has {m.blocks[b].nbytes}")
    q: queue.Queue[object] = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()
    waited = [0.0]

    def reader() -> None:
        try:
            for b in order:
                path = ckpt.block_path(b)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open block file: {e.strerror}") from None
                try:
                    size = os.fstat(fd).st_size
                    if size != m.blocks[b].nbytes:
                        raise CheckpointError(f"{path}: file has {size} bytes, manifest says {m.blocks[b].nbytes} (truncated or replaced)")
                    for ch in m.blocks[b].chunks:
                        if stop.is_set():
                            return
                        if rate is not None:
                            waited[0] += rate.acquire(ch.length)
                        read_exact_into(fd, views[b][ch.offset : ch.offset + ch.length], ch.offset, str(path))
                        q.put((b, ch))
                finally:
                    os.close(fd)
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    t0 = time.perf_counter()
    th = threading.Thread(target=reader, name=f"ssd-reader-{m.name}", daemon=True)
    th.start()
    nbytes = 0
    try:
        remaining = {b: len(m.blocks[b].chunks) for b in order}
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            b, ch = item  # type: ignore[misc]
            if verify:
                verify_chunk(views[b][ch.offset : ch.offset + ch.length], ch, str(ckpt.block_path(b)))
            nbytes += ch.length
            remaining[b] -= 1
            if remaining[b] == 0 and on_block is not None:
                tensors = tensors_of(b) if tensors_of is not None else tensors_from_block_bytes(views[b], where=str(ckpt.block_path(b)))
                on_block(BlockLanded(m.name, b, Tier.HOST, tensors, m.blocks[b].nbytes, time.perf_counter() - t0))
    finally:
        stop.set()
        while th.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(timeout=0.01)
        th.join()
    return LoadStats(m.name, Tier.HOST, tuple(order), nbytes, time.perf_counter() - t0, waited[0])


def copy_to_device(
    model: str,
    sources: Sequence[tuple[int, torch.Tensor]],
    device: torch.device | str,
    chunk_bytes: int = 64 << 20,
    on_block: OnBlock | None = None,
    out: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[int, torch.Tensor], LoadStats]:
    """Copy blocks (``(index, uint8 host tensor)``) into fresh ``device`` buffers, chunk by chunk.

    On CUDA the copies run on a side stream (non-blocking from pinned memory) and each block is
    announced as soon as its copy event completes, while later blocks keep copying. Returns the
    per-block device buffers and stats. ``out`` may supply preallocated destination buffers.
    """
    dev = torch.device(device)
    bufs: dict[int, torch.Tensor] = {} if out is None else out
    t0 = time.perf_counter()
    total = 0
    if dev.type == "cuda":
        stream = torch.cuda.Stream(device=dev)
        events: list[tuple[int, torch.cuda.Event]] = []
        with torch.cuda.stream(stream):
            for b, src in sources:
                dst = bufs.get(b)
                if dst is None:
                    dst = torch.empty(src.numel(), dtype=torch.uint8, device=dev)
                    bufs[b] = dst
                for off in range(0, src.numel(), chunk_bytes):
                    dst[off : off + chunk_bytes].copy_(src[off : off + chunk_bytes], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                events.append((b, ev))
                total += src.numel()
        for b, ev in events:
            ev.synchronize()
            if on_block is not None:
                on_block(BlockLanded(model, b, Tier.GPU, tensors_from_block_bytes(bufs[b]), bufs[b].numel(), time.perf_counter() - t0))
    else:
        for b, src in sources:
            dst = bufs.get(b)
            if dst is None:
                dst = torch.empty(src.numel(), dtype=torch.uint8, device=dev)
                bufs[b] = dst
            for off in range(0, src.numel(), chunk_bytes):
                dst[off : off + chunk_bytes].copy_(src[off : off + chunk_bytes])
            total += src.numel()
            if on_block is not None:
                on_block(BlockLanded(model, b, Tier.GPU, tensors_from_block_bytes(dst), dst.numel(), time.perf_counter() - t0))
    return bufs, LoadStats(model, Tier.GPU, tuple(b for b, _ in sources), total, time.perf_counter() - t0)
