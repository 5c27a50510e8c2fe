"""The chunked, pipelined loader: SSD -> host pool, host pool -> device.

SSD -> host: reader threads ``pread`` chunk i+1 (in pieces, several in flight, ``O_DIRECT`` where
possible) straight into the block's place in the host pool while the calling thread verifies
chunk i's xxh64 (reads release the GIL, so they overlap with hashing). Chunks are ranges of the
model's stream (format version 2) and may span two block files: a chunk's part in a block being
loaded lands in that block's place; its part in a block *not* being loaded (a partial load) is read
into scratch memory only to verify the hash. A block is announced (callback)
only after every chunk overlapping it verified, so a chunk whose hash does not match is never used:
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
import xxhash

from lambdascale.model.checkpoint import Checkpoint, check_digest, read_exact_into, tensors_from_block_bytes
from lambdascale.ratelimit import TokenBucket


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
_PAGE = 4096


def _open_direct(path: os.PathLike[str] | str) -> int | None:
    """An ``O_DIRECT`` descriptor, or None where the platform or file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _read_direct(fd: int, view: memoryview, offset: int, need: int, where: str) -> None:
    """Read whole pages into ``view`` at file ``offset``; at end of file fewer bytes arrive, but
    at least ``need`` must (else the file is truncated)."""
    got = 0
    while got < need:
        try:
            r = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise CheckpointError(f"{where}: read failed at byte {offset + got}: {e.strerror}") from None
        if r <= 0:
            raise CheckpointError(f"{where}: truncated: read stopped at byte {offset + got}, expected {offset + need}")
        got += r
        if got % _PAGE:  # a short, unaligned read only happens at end of file
            break
    if got < need:
        raise CheckpointError(f"{where}: truncated: read stopped at byte {offset + got}, expected {offset + need}")


def load_from_ssd(
    ckpt: Checkpoint,
    dest: Callable[[int], memoryview],
    blocks: Sequence[int] | None = None,
    on_block: OnBlock | None = None,
    tensors_of: Callable[[int], dict[str, torch.Tensor]] | None = None,
    rate: TokenBucket | None = None,
    io_threads: int = 8,
    verify: bool = True,
    direct: bool = True,
    piece_bytes: int = 16 << 20,
) -> LoadStats:
    """Read ``blocks`` (default all, in order) of ``ckpt`` into ``dest(b)``, verifying every chunk,
    announcing each block (in order) once all its chunks verified.

    ``io_threads`` workers read the chunks' pieces (at most ``piece_bytes`` each) in file order,
    so several reads are in flight (NVMe and virtio disks want queue depth) while the calling
    thread hashes the chunks already complete. ``dest(b)`` is a writable memoryview of at least
    the block's size; bytes past the block's size are slack that lets ``direct`` I/O
    (``O_DIRECT``: disk to destination without a page-cache copy) read whole 4 KiB pages. Pieces
    that are not page-aligned in the file or in memory, and file systems that refuse
    ``O_DIRECT``, fall back to buffered reads. ``tensors_of(b)`` builds the announced tensors
    (default: parse the block's bytes in place).
    """
    m = ckpt.manifest
    order = list(range(m.n_blocks)) if blocks is None else list(blocks)
    for b in order:
        if not 0 <= b < m.n_blocks:
            raise CheckpointError(f"{ckpt.dir}: block {b} out of range (model has {m.n_blocks} blocks)")
    if io_threads < 1:
        raise ValueError(f"io_threads must be at least 1, got {io_threads}")
    piece_bytes = max(_PAGE, piece_bytes - piece_bytes % _PAGE)
    full = {b: dest(b) for b in order}
    for b in order:
        if len(full[b]) < m.blocks[b].nbytes:
            raise ValueError(f"destination of block {b} holds {len(full[b])} bytes, the block has {m.blocks[b].nbytes}")
    views = {b: full[b][: m.blocks[b].nbytes] for b in order}

    # open every file and check its size before reading anything
    fds: dict[int, tuple[int, int | None]] = {}

    def open_block(b: int) -> None:
        path = ckpt.block_path(b)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open block file: {e.strerror}") from None
        fds[b] = (fd, _open_direct(path) if direct and b in views else None)
        size = os.fstat(fd).st_size
        if b in views and size != m.blocks[b].nbytes:
            raise CheckpointError(f"{path}: file has {size} bytes, manifest says {m.blocks[b].nbytes} (truncated or replaced)")

    # chunks overlapping the loaded blocks, in load order; each chunk's parts per block file:
    # (block, offset in the block file, length, destination view)
    chunk_order: list[int] = []
    listed: set[int] = set()
    for b in order:
        for c in m.chunks_of_block(b):
            if c not in listed:
                listed.add(c)
                chunk_order.append(c)
    parts: dict[int, list[tuple[int, int, int, memoryview]]] = {}
    try:
        for b in order:
            open_block(b)
        for c in chunk_order:
            parts[c] = []
            for bb, s0, ln in m.chunk_parts(c):
                if bb in views:
                    dst = views[bb][s0 : s0 + ln]
                else:  # neighbour not loaded: read its part only to verify the chunk
                    if bb not in fds:
                        open_block(bb)
                    dst = memoryview(bytearray(ln))
                parts[c].append((bb, s0, ln, dst))
    except BaseException:
        for fd, dfd in fds.values():
            os.close(fd)
            if dfd is not None:
                os.close(dfd)
        raise

    # pieces in load order: (block, chunk, offset in the block file, length, destination)
    pieces: list[tuple[int, int, int, int, memoryview]] = []
    left: dict[int, int] = {}
    for c in chunk_order:
        n = 0
        for bb, off0, ln0, dst in parts[c]:
            for off in range(off0, off0 + ln0, piece_bytes):
                ln = min(piece_bytes, off0 + ln0 - off)
                pieces.append((bb, c, off, ln, dst[off - off0 : off - off0 + ln]))
                n += 1
        left[c] = n
    q: queue.Queue[object] = queue.Queue()
    stop = threading.Event()
    lock = threading.Lock()
    next_piece = [0]
    waited = [0.0]
    bases = {b: _address(full[b]) for b in order}

    def worker() -> None:
        try:
            while not stop.is_set():
                with lock:
                    i = next_piece[0]
                    next_piece[0] += 1
                if i >= len(pieces):
                    return
                b, c, off, ln, dst = pieces[i]
                if rate is not None:
                    w = rate.acquire(ln)
                    with lock:
                        waited[0] += w
                fd, dfd = fds[b]
                padded = -(-ln // _PAGE) * _PAGE
                where = str(ckpt.block_path(b))
                if (dfd is not None and b in bases and off % _PAGE == 0 and (bases[b] + off) % _PAGE == 0
                        and off + padded <= len(full[b])):
                    _read_direct(dfd, full[b][off : off + padded], off, ln, where)
                else:
                    read_exact_into(fd, dst, off, where)
                with lock:
                    left[c] -= 1
                    done = left[c] == 0
                if done:
                    q.put(c)
        except BaseException as e:  # handed to the consumer, which re-raises it
            stop.set()
            q.put(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"ssd-reader-{m.name}-{i}", daemon=True) for i in range(io_threads)]
    for th in threads:
        th.start()
    nbytes = 0
    try:
        chunks_left = {b: len(m.chunks_of_block(b)) for b in order}
        announce = 0  # index into order of the next block to announce
        for _ in range(len(chunk_order)):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            c = item  # type: ignore[assignment]
            ch = m.chunk(c)
            if verify:
                h = xxhash.xxh64()
                for _bb, _off, _ln, dst in parts[c]:
                    h.update(dst)
                check_digest(h.hexdigest(), ch, " + ".join(str(ckpt.block_path(p[0])) for p in parts[c]))
            for bb, _off, ln, dst in parts[c]:
                if bb in chunks_left:
                    nbytes += ln
                    chunks_left[bb] -= 1
            while announce < len(order) and chunks_left[order[announce]] == 0:
                bb = order[announce]
                announce += 1
                if on_block is not None:
                    tensors = tensors_of(bb) if tensors_of is not None else tensors_from_block_bytes(views[bb], where=str(ckpt.block_path(bb)))
                    on_block(BlockLanded(m.name, bb, Tier.HOST, tensors, m.blocks[bb].nbytes, time.perf_counter() - t0))
    finally:
        stop.set()
        for th in threads:
            th.join()
        for fd, dfd in fds.values():
            os.close(fd)
            if dfd is not None:
                os.close(dfd)
    return LoadStats(m.name, Tier.HOST, tuple(order), nbytes, time.perf_counter() - t0, waited[0])


@dataclass(frozen=True)
class PendingCopy:
    """A block copy queued on a device stream: ``event`` fires when ``buffer`` holds the block."""

    block: int
    buffer: torch.Tensor
    event: "torch.cuda.Event | None"


def enqueue_copies(
    sources: Sequence[tuple[int, torch.Tensor]],
    device: torch.device | str,
    chunk_bytes: int = 64 << 20,
    out: dict[int, torch.Tensor] | None = None,
    stream: "torch.cuda.Stream | None" = None,
) -> list[PendingCopy]:
    """Queue host -> device copies of blocks (``(index, uint8 host tensor)``), chunk by chunk, and
    return at once with one event per block (CUDA: copies run on ``stream``, non-blocking from
    pinned memory; a compute stream can ``wait_event`` block b and run it while b+1 copies).
    On CPU each block is copied here in one piece and the events are None.
    """
    dev = torch.device(device)
    bufs: dict[int, torch.Tensor] = {} if out is None else out
    pending: list[PendingCopy] = []
    if dev.type == "cuda":
        stream = stream or torch.cuda.Stream(device=dev)
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
                pending.append(PendingCopy(b, dst, ev))
        return pending
    for b, src in sources:
        dst = bufs.get(b)
        if dst is None:
            dst = torch.empty(src.numel(), dtype=torch.uint8, device=dev)
            bufs[b] = dst
        # one copy per block: on CPU the copy is synchronous anyway, and small copies lose
        # torch's parallel memcpy (measured: 64 MB pieces ~0.6x the speed of one copy)
        dst.copy_(src)
        pending.append(PendingCopy(b, dst, None))
    return pending


def copy_to_device(
    model: str,
    sources: Sequence[tuple[int, torch.Tensor]],
    device: torch.device | str,
    chunk_bytes: int = 64 << 20,
    on_block: OnBlock | None = None,
    out: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[int, torch.Tensor], LoadStats]:
    """Copy blocks into ``device`` buffers and announce each as it lands (see :func:`enqueue_copies`).

    On CUDA every copy is queued first; block b is announced when its event completes while later
    blocks keep copying. Returns the per-block device buffers and stats.
    """
    bufs: dict[int, torch.Tensor] = {} if out is None else out
    t0 = time.perf_counter()
    pending = enqueue_copies(sources, device, chunk_bytes, bufs)
    for p in pending:
        if p.event is not None:
            p.event.synchronize()
        if on_block is not None:
            on_block(BlockLanded(model, p.block, Tier.GPU, tensors_from_block_bytes(p.buffer), p.buffer.numel(),
                                 time.perf_counter() - t0))
    total = sum(p.buffer.numel() for p in pending)
    return bufs, LoadStats(model, Tier.GPU, tuple(p.block for p in pending), total, time.perf_counter() - t0)
