"""Agent side of the memory manager: which tier holds each model on this node, with bytes and last use.

A node agent keeps a model's weights in one transport-registered buffer holding the model's byte
stream (block files concatenated; the multicast's landing zone and what stages are built from). On a CPU node the "GPU" tier and the host tier are
therefore the same bytes; what differs is *why* the node keeps them, and that is what this module
tracks, as labels on a model's buffers:

- ``gpu``: the model was received or loaded for an instance (``PrepareReceive``, ``HoldModel(tier=gpu)``)
  or a stage is built from it (``FormStage``). It costs no host capacity (it stands for device memory).
- ``host``: the model is cached in the host tier. It holds a reservation of the node's host capacity
  (``runtime.host_capacity_gb``) in a :class:`~lambdascale.store.pool.RangeAllocator`, taken *before*
  any byte is copied or labelled, so the tier is never over-committed (``PoolFullError`` otherwise).
- ``ssd``: block files plus manifest under the agent's own store directory
  (``runtime.agent_ssd_dir``/node<N>/<model>), capacity ``runtime.agent_ssd_capacity_gb``.

Copy-back gpu -> host reserves capacity, then re-verifies every block's chunks (xxh64) in a worker
thread; the host holding is partial (``blocks`` so far) until that finishes, so the control plane's
memory policy counts it as in progress. Copy-back -> ssd writes the block files in a worker thread
(temporary directory, then rename). Neither blocks the agent's loop, so serving continues.

The buffers are freed when the last of the ``gpu``/``host`` labels goes. An eviction is refused
(:class:`MemoryRefusedError`, nothing freed) while the copy is in use: a stage built from it, a send
list still running (the node is a multicast source), a receive or load not finished, or a copy-back
reading it.

All state here is plain bookkeeping driven by the agent; the clock is injected (``now`` arguments),
so it is unit-testable without processes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import xxhash

from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import Manifest
from lambdascale.store.pool import Allocation, PoolFullError, RangeAllocator


class MemTier(str, Enum):
    """Tiers an agent reports (same names as ``control.snapshot.Tier``)."""

    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"


class MemoryRefusedError(LambdaScaleError):
    """An eviction or copy-back that would break a copy in use, or exceed a tier's capacity."""


GB = 1_000_000_000


@dataclass
class Residency:
    """One model on this agent: its tier labels, the host reservation and what is using it."""

    manifest: Manifest
    gpu: bool = False
    host_alloc: Allocation | None = None
    host_blocks: set[int] = field(default_factory=set)  # blocks verified into the host tier
    ssd_alloc: Allocation | None = None
    ssd_complete: bool = False
    last_used: dict[MemTier, float] = field(default_factory=dict)
    holds: int = 0  # HoldModel loads writing the buffers
    copies: int = 0  # copy-backs reading the buffers or the SSD files
    stages: set[str] = field(default_factory=set)  # pipelines with a stage built from it here

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def host(self) -> bool:
        return self.host_alloc is not None

    @property
    def host_complete(self) -> bool:
        return self.host and len(self.host_blocks) == self.manifest.n_blocks

    @property
    def labelled(self) -> bool:
        """True while the block buffers must be kept (some tier other than SSD claims them)."""
        return self.gpu or self.host


class AgentMemory:
    """Per-agent tier bookkeeping; the agent calls it from its message handlers."""

    def __init__(self, node: int, host_capacity_bytes: int, ssd_dir: Path | None, ssd_capacity_bytes: int) -> None:
        self.node = node
        self.host = RangeAllocator(host_capacity_bytes, align=4096)
        self.ssd_dir = ssd_dir
        self.ssd = RangeAllocator(ssd_capacity_bytes, align=4096) if ssd_dir is not None else None
        self.models: dict[str, Residency] = {}
        if ssd_dir is not None:
            ssd_dir.mkdir(parents=True, exist_ok=True)
            self._scan_ssd()

    # ---- state changes driven by the agent -------------------------------------------------
    def residency(self, manifest: Manifest) -> Residency:
        r = self.models.get(manifest.name)
        if r is None:
            r = self.models[manifest.name] = Residency(manifest)
        return r

    def reserve_host(self, r: Residency) -> None:
        """Take the host reservation for ``r`` (no-op when held); ``MemoryRefusedError`` when full."""
        if r.host_alloc is not None:
            return
        r.host_alloc = self._take(self.host, r, "host", "runtime.host_capacity_gb")
        r.host_blocks = set()

    def touch(self, model: str, now: float, tiers: tuple[MemTier, ...] = (MemTier.GPU, MemTier.HOST)) -> None:
        r = self.models.get(model)
        if r is not None:
            for t in tiers:
                r.last_used[t] = now

    def busy_reasons(self, r: Residency, receiving: bool, sending: bool) -> list[str]:
        """Why ``r``'s buffers are in use right now (empty when they may be freed)."""
        out = []
        if r.stages:
            out.append(f"stage(s) of pipeline(s) {sorted(r.stages)} built from it")
        if sending:
            out.append("a send list (multicast) still running from it")
        if receiving:
            out.append("a receive not finished (chunks still arriving)")
        if r.holds:
            out.append("a load into its buffers in progress")
        if r.copies:
            out.append("a copy-back reading it")
        return out

    def evict(self, model: str, tier: MemTier, receiving: bool, sending: bool) -> tuple[bool, bool]:
        """Drop ``model``'s ``tier`` label/copy. Returns (evicted, free_buffers).

        Refused (:class:`MemoryRefusedError`, nothing changed) when the copy is in use: the GPU copy
        while a stage, send, receive, load or copy-back uses the buffers; the host copy when it is
        the last claim on buffers in use; the SSD copy while a copy-back writes or reads it.
        """
        r = self.models.get(model)
        if r is None:
            return False, False
        what = f"node {self.node}: cannot evict {model!r} from the {tier.value} tier"
        if tier is MemTier.SSD:
            if r.ssd_alloc is None:
                return False, False
            if r.copies:
                raise MemoryRefusedError(f"{what}: a copy-back is using its SSD copy")
            assert self.ssd_dir is not None and self.ssd is not None
            shutil.rmtree(self.ssd_dir / model, ignore_errors=True)
            self.ssd.free(r.ssd_alloc)
            r.ssd_alloc, r.ssd_complete = None, False
            r.last_used.pop(MemTier.SSD, None)
            return True, False
        if tier is MemTier.GPU:
            if not r.gpu:
                return False, False
            busy = self.busy_reasons(r, receiving, sending)
            if r.host:  # the buffers stay (host copy): only the device copy's own users matter
                busy = [b for b in busy if not b.startswith(("a load", "a copy-back"))]
            if busy:
                raise MemoryRefusedError(f"{what}: in use ({'; '.join(busy)})")
            r.gpu = False
            r.last_used.pop(MemTier.GPU, None)
        else:
            if not r.host:
                return False, False
            if r.copies:
                raise MemoryRefusedError(f"{what}: a copy-back is using it")
            if not r.gpu:
                busy = self.busy_reasons(r, receiving, sending)
                if busy:
                    raise MemoryRefusedError(f"{what}: in use ({'; '.join(busy)})")
            assert r.host_alloc is not None
            self.host.free(r.host_alloc)
            r.host_alloc = None
            r.host_blocks = set()
            r.last_used.pop(MemTier.HOST, None)
        free_buffers = not r.labelled
        if free_buffers and r.ssd_alloc is None:
            del self.models[model]
        return True, free_buffers

    def forget(self, model: str) -> None:
        """The agent dropped the model's buffers (``DropModel``): release every in-memory claim."""
        r = self.models.get(model)
        if r is None:
            return
        if r.host_alloc is not None:
            self.host.free(r.host_alloc)
        r.host_alloc, r.host_blocks, r.gpu = None, set(), False
        r.stages.clear()
        if r.ssd_alloc is None:
            del self.models[model]

    # ---- host verification (copy-back gpu -> host) -------------------------------------------
    @staticmethod
    def verify_block(manifest: Manifest, block: int, stream: memoryview) -> None:
        """Check every chunk overlapping ``block`` in ``stream`` (the model's whole byte stream)
        against the manifest (raises naming the chunk)."""
        for c in manifest.chunks_of_block(block):
            ch = manifest.chunk(c)
            if xxhash.xxh64(stream[ch.offset: ch.end]).hexdigest() != ch.xxh64:
                raise LambdaScaleError(f"{manifest.name} block {block} chunk {ch.index} fails its xxh64 check")

    # ---- SSD tier ------------------------------------------------------------------------------
    def ssd_path(self, model: str) -> Path | None:
        r = self.models.get(model)
        if self.ssd_dir is None or r is None or not r.ssd_complete:
            return None
        return self.ssd_dir / model

    def reserve_ssd(self, r: Residency) -> None:
        if self.ssd is None:
            raise MemoryRefusedError(f"node {self.node} has no SSD tier (runtime.agent_ssd_dir is not set)")
        if r.ssd_alloc is not None:
            return
        r.ssd_alloc = self._take(self.ssd, r, "SSD", "runtime.agent_ssd_capacity_gb")

    def _take(self, pool: RangeAllocator, r: Residency, tier: str, setting: str) -> Allocation:
        """``r.nbytes`` from ``pool``; a full pool is a ``MemoryRefusedError`` naming the setting."""
        try:
            return pool.alloc(r.nbytes)
        except PoolFullError as e:
            raise MemoryRefusedError(
                f"node {self.node}: {tier} tier cannot take {r.manifest.name!r} ({r.nbytes} bytes): {e} ({setting})"
            ) from None

    def write_ssd(self, manifest: Manifest, stream: memoryview) -> Path:
        """Write the model's block files (slices of its byte ``stream``) and manifest under the SSD
        dir (temp dir + rename); blocking."""
        assert self.ssd_dir is not None
        if len(stream) != manifest.total_bytes:
            raise LambdaScaleError(f"{manifest.name}: stream holds {len(stream)} bytes, the manifest {manifest.total_bytes}")
        final = self.ssd_dir / manifest.name
        tmp = self.ssd_dir / f".{manifest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for blk in manifest.blocks:
            data = stream[blk.offset : blk.end]
            with open(tmp / blk.file, "wb") as f:
                n = f.write(data)
                if n != blk.nbytes:
                    raise LambdaScaleError(f"{tmp / blk.file}: short write ({n} of {blk.nbytes} bytes)")
                f.flush()
                os.fsync(f.fileno())
        (tmp / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json")))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final

    def _scan_ssd(self) -> None:
        """Adopt complete model copies already in the SSD dir (an agent restarted on the same disk)."""
        from lambdascale.model.manifest import read_manifest

        assert self.ssd_dir is not None and self.ssd is not None
        for d in sorted(self.ssd_dir.iterdir()):
            if d.name.startswith("."):  # a copy-back that died mid-write
                shutil.rmtree(d, ignore_errors=True)
                continue
            if not (d / "manifest.json").exists():
                continue
            try:
                man = read_manifest(d)
                r = self.residency(man)
                r.ssd_alloc = self.ssd.alloc(man.total_bytes)
                r.ssd_complete = True
            except (LambdaScaleError, PoolFullError):
                continue

    def verify_ssd(self) -> dict[str, str]:
        """Check every complete SSD copy's block files against the manifest's chunk checksums
        (blocking: a worker thread's job). A copy that fails (a file missing, short, or with a
        chunk whose xxh64 differs) is removed and its capacity freed: a node reports only what it
        really holds. Returns model -> "ok" or why it was dropped."""
        out: dict[str, str] = {}
        if self.ssd_dir is None or self.ssd is None:
            return out
        for name, r in list(self.models.items()):
            if not r.ssd_complete or r.copies:
                continue
            why = self._check_files(self.ssd_dir / name, r.manifest)
            out[name] = why or "ok"
            if why is None:
                continue
            shutil.rmtree(self.ssd_dir / name, ignore_errors=True)
            if r.ssd_alloc is not None:
                self.ssd.free(r.ssd_alloc)
            r.ssd_alloc, r.ssd_complete = None, False
            r.last_used.pop(MemTier.SSD, None)
            if not r.labelled:
                del self.models[name]
        return out

    @staticmethod
    def _check_files(d: Path, m: Manifest) -> str | None:
        """None when every chunk of ``m`` reads back from ``d``'s block files with its xxh64."""
        files: dict[int, Any] = {}
        try:
            for blk in m.blocks:
                path = d / blk.file
                if not path.is_file() or path.stat().st_size != blk.nbytes:
                    return f"{path} is missing or not {blk.nbytes} bytes"
            for ch in m.chunks:
                h = xxhash.xxh64()
                for b, off, ln in m.chunk_parts(ch.index):
                    f = files.get(b)
                    if f is None:
                        f = files[b] = open(d / m.blocks[b].file, "rb")
                    f.seek(off)
                    data = f.read(ln)
                    if len(data) != ln:
                        return f"{d / m.blocks[b].file}: short read"
                    h.update(data)
                if h.hexdigest() != ch.xxh64:
                    return f"chunk {ch.index} fails its xxh64 check"
        except OSError as e:
            return f"cannot read {d}: {e}"
        finally:
            for f in files.values():
                f.close()
        return None

    # ---- report ----------------------------------------------------------------------------------
    def report(self, now: float, held: dict[str, set[int]], receiving: set[str], sending: set[str]) -> dict:
        """The node's holdings per model and tier (``HoldingsReport`` fields; ``held`` = chunks held)."""
        rows = []
        for name in sorted(self.models):
            r = self.models[name]
            in_use = bool(self.busy_reasons(r, name in receiving, name in sending))

            def idle(t: MemTier, r: Residency = r) -> float:
                return max(0.0, now - r.last_used.get(t, now))

            if r.gpu:
                have = held.get(name, set())
                full = len(have) == r.manifest.n_chunks and not r.holds
                blocks = None if full else sorted(self._blocks_held(r.manifest, have))
                rows.append({"model": name, "tier": "gpu", "nbytes": r.nbytes, "blocks": blocks,
                             "idle_s": idle(MemTier.GPU), "in_use": in_use})
            if r.host:
                blocks = None if r.host_complete and not r.holds else sorted(r.host_blocks)
                rows.append({"model": name, "tier": "host", "nbytes": r.nbytes, "blocks": blocks,
                             "idle_s": idle(MemTier.HOST), "in_use": in_use})
            if r.ssd_alloc is not None:
                rows.append({"model": name, "tier": "ssd", "nbytes": r.nbytes, "blocks": None if r.ssd_complete else [],
                             "idle_s": idle(MemTier.SSD), "in_use": bool(r.copies)})
        return {
            "node": self.node,
            "host_capacity_bytes": self.host.capacity, "host_free_bytes": self.host.free_bytes,
            "ssd_capacity_bytes": self.ssd.capacity if self.ssd is not None else 0,
            "ssd_free_bytes": self.ssd.free_bytes if self.ssd is not None else 0,
            "holdings": rows, "buffers": sorted(n for n, r in self.models.items() if r.labelled),
        }

    @staticmethod
    def _blocks_held(manifest: Manifest, have: set[int]) -> set[int]:
        """Blocks whose every chunk is in ``have`` (held, verified chunk indices)."""
        return manifest.layout.blocks_held(have)
