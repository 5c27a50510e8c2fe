"""Reading and writing checkpoints in our block format (see :mod:`lambdascale.model.manifest`).

This module works on model directories (the manifest, atomic writes, reading a block with its
chunks verified, finding models); the bytes of one block file and the chunk-checked I/O under it
are :mod:`lambdascale.model.blockfile`, whose public names this module re-exports.

Why one safetensors file per execution block: a block is then one contiguous byte range that can
be read, sent, pinned and copied without reshaping, and parsed where it lands
(:func:`tensors_from_block_bytes` makes zero-copy views over the bytes). We write the safetensors
files ourselves (the layout is the standard one, readable by ``safetensors.torch.load_file``) so
that the header is padded to 64 bytes, every tensor is aligned for ``torch.frombuffer``/``view``,
and the per-chunk xxh64 is computed while the bytes stream to disk.

Chunks (format version 2, see :mod:`lambdascale.model.manifest`) are equal-byte ranges of the
model's stream (block files concatenated), so one may span two files. The writer knows every
block file's size before writing any (the header depends only on names, dtypes and shapes), so it
cuts the stream up front and hashes each chunk as its bytes stream out, across files.

Integrity: a model directory is built under a temporary name and renamed into place, so a crash
never leaves a partial model that looks whole; every write is checked for short writes; every
chunk read is checked against its xxh64 before any byte of it is used. Reading one block verifies
every chunk overlapping it, which for a chunk spanning a block boundary means also reading the
neighbour file's part of that chunk (at most one partial chunk on each side).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import xxhash

from lambdascale.errors import CheckpointError, ModelNotFoundError
from lambdascale.model.arch import ModelArch, plan_blocks
from lambdascale.model.generation import GenerationDefaults
from lambdascale.model.blockfile import (  # re-exported: runtime, store and benches import them from here
    ALIGN,
    MAX_HEADER_BYTES,
    TORCH_DTYPES,
    StreamHasher,
    _header_bytes,
    block_tensor_shapes,
    check_digest,
    chunk_ranges,
    header_from_specs,
    layer_tensor_shapes,
    model_tensor_bytes,
    read_exact_into,
    tensors_from_block_bytes,
    verify_chunk,
    write_all,
    write_block_file,
)
from lambdascale.model.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    BlockEntry,
    ChunkEntry,
    DType,
    Manifest,
    TensorEntry,
    block_file_name,
    read_manifest,
)


# ---- the checkpoint object ----------------------------------------------------------------

class Checkpoint:
    """A model directory in our block format, opened and validated (manifest only)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self.manifest: Manifest = read_manifest(self.dir)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Checkpoint({str(self.dir)!r}, blocks={m.n_blocks}, chunks={m.n_chunks}, dtype={m.dtype.value})"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def arch(self) -> ModelArch:
        return self.manifest.arch

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.manifest.dtype]

    def block_path(self, b: int) -> Path:
        if not 0 <= b < self.manifest.n_blocks:
            raise CheckpointError(f"{self.dir}: block {b} out of range (model has {self.manifest.n_blocks} blocks)")
        return self.dir / self.manifest.blocks[b].file

    @property
    def tokenizer_dir(self) -> Path:
        """``tokenizer/``; raises :class:`CheckpointError` naming any file the manifest lists but is missing."""
        d = self.dir / TOKENIZER_DIR
        files = self.manifest.tokenizer_files
        if not files:
            raise CheckpointError(f"{self.dir}: model {self.name!r} has no tokenizer (manifest lists no tokenizer files)")
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{d}: missing tokenizer file(s): {', '.join(missing)}")
        return d

    def _open(self, b: int, fds: dict[int, int], check_size: bool) -> int:
        fd = fds.get(b)
        if fd is None:
            path = self.block_path(b)
            try:
                fd = fds[b] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open block file: {e.strerror}") from None
            nbytes = self.manifest.blocks[b].nbytes
            size = os.fstat(fd).st_size
            if check_size and size != nbytes:
                raise CheckpointError(f"{path}: file has {size} bytes, manifest says {nbytes} (truncated or replaced)")
        return fd

    def read_block_into(self, b: int, out: memoryview, verify: bool = True) -> None:
        """Read block ``b`` into ``out`` (exactly ``nbytes`` long), verifying every chunk overlapping it.

        A chunk that spans a block boundary is hashed over its bytes in both files: the
        neighbour's part is read into scratch memory (never into ``out``), so verifying a block
        costs at most one partial chunk of extra reading on each side.
        """
        m = self.manifest
        entry = m.blocks[b]
        path = self.block_path(b)
        if len(out) != entry.nbytes:
            raise ValueError(f"destination holds {len(out)} bytes, block {b} has {entry.nbytes}")
        fds: dict[int, int] = {}
        try:
            self._open(b, fds, check_size=True)
            for c in m.chunks_of_block(b):
                ch = m.chunk(c)
                h = xxhash.xxh64()
                for bb, off, ln in m.chunk_parts(c):
                    if bb != b and not verify:
                        continue
                    view = out[off : off + ln] if bb == b else memoryview(bytearray(ln))
                    read_exact_into(self._open(bb, fds, check_size=False), view, off, str(self.block_path(bb)))
                    if verify:
                        h.update(view)
                if verify:
                    check_digest(h.hexdigest(), ch, str(path))
        finally:
            for fd in fds.values():
                os.close(fd)

    def read_block(self, b: int) -> bytearray:
        """The verified bytes of block ``b`` (every chunk's xxh64 checked before returning)."""
        buf = bytearray(self.manifest.blocks[b].nbytes)
        self.read_block_into(b, memoryview(buf))
        return buf

    def block_tensors(self, b: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Canonical-named tensors of block ``b`` on ``device`` (optionally cast to ``dtype``)."""
        tensors = tensors_from_block_bytes(self.read_block(b), where=str(self.block_path(b)))
        if str(device) == "cpu" and dtype is None:
            return tensors
        return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}


# ---- writing ---------------------------------------------------------------------------

BlockSource = Callable[[int, tuple[int, int]], Mapping[str, torch.Tensor]]
"""Called once per block with (block index, layer range); returns that block's tensors."""


def _check_writable(models_dir: Path) -> None:
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"models directory {models_dir} cannot be created: {e.strerror}") from None
    if not os.access(models_dir, os.W_OK | os.X_OK):
        raise CheckpointError(f"models directory {models_dir} is not writable (set --models-dir or LAMBDASCALE_MODELS)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(models_dir: Path, name: str) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>-*`` directories left by imports whose process died (a crash
    mid-import); temporaries of a live process are left alone. Returns what was removed."""
    removed = []
    for p in models_dir.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name[len(f".{name}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_checkpoint(
    models_dir: str | Path,
    name: str,
    arch: ModelArch,
    dtype: DType | str,
    block_source: BlockSource,
    tokenizer_files: Mapping[str, bytes] | None = None,
    n_blocks: int = 8,
    chunks_per_block: int = 2,
    source: str = "",
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    source_dtype: Callable[[str], str | None] | None = None,
    generation: GenerationDefaults | None = None,
) -> Checkpoint:
    """Write a model in our format, atomically: temp dir, fsynced files, one rename.

    ``block_source(b, layers)`` is called once per block, so only one block's tensors are in
    memory at a time. Every tensor is checked against the names and shapes the arch implies and
    cast to ``dtype``. The model gets ``K = blocks x chunks_per_block`` equal-byte transfer chunks
    over its whole stream (format version 2). The manifest lists every tensor's dtype, shape and
    byte range, with ``source_dtype(name)`` (what it was converted from) when given. ``progress(tensor_bytes)`` is called after each block file is written
    (tensor bytes, header excluded, so the total is known up front: :func:`model_tensor_bytes`).
    """
    models_dir = Path(models_dir)
    dtype = DType(dtype)
    tdtype = TORCH_DTYPES[dtype]
    if "/" in name or name.startswith(".") or not name:
        raise CheckpointError(f"invalid model name {name!r} (no '/', not starting with '.')")
    _check_writable(models_dir)
    final = models_dir / name
    if final.exists() and not force:
        raise CheckpointError(f"{final} already exists (use --force to replace it)")
    ranges = plan_blocks(arch.num_hidden_layers, n_blocks)
    # every block file's size is known before any is written (the header depends only on names,
    # dtypes and shapes): cut the model's stream into equal-byte chunks up front
    expected_sizes: list[int] = []
    for b, layers in enumerate(ranges):
        shapes = block_tensor_shapes(arch, layers, b == 0, b == len(ranges) - 1)
        head = header_from_specs({k: (tdtype, v) for k, v in shapes.items()})
        expected_sizes.append(len(head) + sum(math.prod(v) for v in shapes.values()) * dtype.itemsize)
    if chunks_per_block < 1:
        raise CheckpointError(f"chunks_per_block must be >= 1, got {chunks_per_block}")
    hasher = StreamHasher(sum(expected_sizes), len(ranges) * chunks_per_block)
    remove_stale_temporaries(models_dir, name)
    tmp = models_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"models directory {models_dir} is not writable: {e.strerror}") from None
    try:
        blocks: list[BlockEntry] = []
        offset = 0
        for b, layers in enumerate(ranges):
            expected = block_tensor_shapes(arch, layers, b == 0, b == len(ranges) - 1)
            got = block_source(b, layers)
            if set(got) != set(expected):
                missing = sorted(set(expected) - set(got))[:5]
                extra = sorted(set(got) - set(expected))[:5]
                raise CheckpointError(f"{name}: block {b} tensors do not match the arch (missing {missing}, unexpected {extra})")
            ordered: dict[str, torch.Tensor] = {}
            for tname, shape in expected.items():
                t = got[tname]
                if tuple(t.shape) != shape:
                    raise CheckpointError(f"{name}: tensor {tname} has shape {tuple(t.shape)}, the arch says {shape}")
                ordered[tname] = t.to(tdtype)
            fname = block_file_name(b)
            data_bytes = sum(t.numel() * t.element_size() for t in ordered.values())
            nbytes = write_block_file(tmp / fname, ordered, hasher)
            del ordered, got
            if nbytes != expected_sizes[b]:
                raise CheckpointError(f"{name}: block {b} file has {nbytes} bytes, planned {expected_sizes[b]}")
            head_len = len(header_from_specs({k: (tdtype, v) for k, v in expected.items()}))
            entries, pos = [], head_len
            for tname, shape in expected.items():
                n = math.prod(shape) * dtype.itemsize
                entries.append(TensorEntry(name=tname, dtype=dtype, shape=shape, offset=pos, nbytes=n,
                                           source_dtype=source_dtype(tname) if source_dtype else None))
                pos += n
            blocks.append(BlockEntry(index=b, layers=layers, file=fname, offset=offset, nbytes=nbytes,
                                     tensors=tuple(entries)))
            offset += nbytes
            if progress is not None:
                progress(data_bytes)
        tok_names: list[str] = []
        if tokenizer_files:
            (tmp / TOKENIZER_DIR).mkdir()
            for fname, data in tokenizer_files.items():
                p = tmp / TOKENIZER_DIR / fname
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    write_all(fd, data, p)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                tok_names.append(fname)
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=name, arch=arch, dtype=dtype,
            tokenizer_files=sorted(tok_names), source=source, blocks=blocks, chunks=hasher.chunks(),
            generation=generation,
        )
        mpath = tmp / MANIFEST_NAME
        fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, manifest.model_dump_json(indent=1).encode(), mpath)
            os.fsync(fd)
        finally:
            os.close(fd)
        if final.exists():
            trash = models_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        dfd = os.open(models_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint(final)


# ---- finding models -----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """One row of ``lambdascale models``."""

    name: str
    path: Path
    total_bytes: int
    n_blocks: int
    n_chunks: int
    dtype: str
    family: str
    layers: int
    source: str
    error: str | None = None


def list_models(models_dir: str | Path) -> list[ModelInfo]:
    """Every model directory under ``models_dir`` (temporaries skipped; broken ones reported with their error)."""
    d = Path(models_dir)
    if not d.is_dir():
        return []
    out: list[ModelInfo] = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            m = read_manifest(p)
        except CheckpointError as e:
            out.append(ModelInfo(p.name, p, 0, 0, 0, "?", "?", 0, "", error=str(e)))
            continue
        out.append(ModelInfo(m.name, p, m.total_bytes, m.n_blocks, m.n_chunks, m.dtype.value,
                             m.arch.family.value, m.arch.num_hidden_layers, m.source))
    return out


def find_model(models_dir: str | Path, name: str) -> Checkpoint:
    """Open model ``name`` under ``models_dir``; the error lists the models that exist."""
    d = Path(models_dir)
    p = d / name
    if not (p / MANIFEST_NAME).is_file():
        have = [m.name for m in list_models(d) if m.error is None]
        listing = ", ".join(have) if have else "none"
        raise ModelNotFoundError(
            f"model {name!r} not found in {d} (models there: {listing}); import it with `lambdascale import`"
        )
    return Checkpoint(p)


def iter_block_chunks(ckpt: Checkpoint, b: int) -> Iterator[ChunkEntry]:
    """The chunks overlapping block ``b`` in order (a boundary chunk may overlap a neighbour too)."""
    m = ckpt.manifest
    for c in m.chunks_of_block(b):
        yield m.chunk(c)


__all__ = [
    "ALIGN", "MAX_HEADER_BYTES", "TORCH_DTYPES", "BlockSource", "Checkpoint", "ModelInfo", "StreamHasher",
    "block_tensor_shapes", "check_digest", "chunk_ranges", "find_model", "iter_block_chunks", "layer_tensor_shapes",
    "list_models", "model_tensor_bytes", "read_exact_into", "remove_stale_temporaries", "tensors_from_block_bytes",
    "verify_chunk", "write_block_file", "write_checkpoint",
]
