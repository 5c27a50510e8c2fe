"""Reading and writing checkpoints in our block format (see :mod:`lambdascale.model.manifest`).

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

import json
import math
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import xxhash

from lambdascale.errors import CheckpointError, ModelNotFoundError
from lambdascale.model.arch import ModelArch, plan_blocks
from lambdascale.model.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_DIR,
    BlockEntry,
    ChunkEntry,
    DType,
    Manifest,
    block_file_name,
    read_manifest,
)
from lambdascale.pipe.layout import LayoutError, equal_chunk_bounds

#: Alignment of the data section and of every tensor inside a block file, in bytes.
ALIGN = 64
#: Upper bound on a safetensors header we accept (guards against garbage length prefixes).
MAX_HEADER_BYTES = 64 * 1024 * 1024

_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U8": torch.uint8,
    "I64": torch.int64,
    "I32": torch.int32,
}

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
}


# ---- canonical tensor names ----------------------------------------------------------------

def layer_tensor_shapes(arch: ModelArch, i: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of decoder layer ``i`` (weights are [out_features, in_features])."""
    h, d = arch.hidden_size, arch.dim_per_head
    q, kv, ff = arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.intermediate_size
    p = f"model.layers.{i}."
    out: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (ff, h),
        p + "mlp.up_proj.weight": (ff, h),
        p + "mlp.down_proj.weight": (h, ff),
    }
    if arch.attention_bias:
        out[p + "self_attn.q_proj.bias"] = (q,)
        out[p + "self_attn.k_proj.bias"] = (kv,)
        out[p + "self_attn.v_proj.bias"] = (kv,)
    return out


def block_tensor_shapes(arch: ModelArch, layers: tuple[int, int], first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor an execution block holds, in file order, with its shape.

    Block 0 adds ``model.embed_tokens.weight``; the last block adds ``model.norm.weight`` and
    ``lm_head.weight`` (an explicit copy of the embedding when they are tied), so any block range
    runs alone.
    """
    out: dict[str, tuple[int, ...]] = {}
    if first:
        out["model.embed_tokens.weight"] = (arch.vocab_size, arch.hidden_size)
    for i in range(*layers):
        out.update(layer_tensor_shapes(arch, i))
    if last:
        out["model.norm.weight"] = (arch.hidden_size,)
        out["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return out


def model_tensor_bytes(arch: ModelArch, n_blocks: int, itemsize: int) -> int:
    """Tensor bytes of a whole checkpoint (headers excluded; a tied LM head counted as its copy)."""
    total = 0
    for b, layers in enumerate(plan_blocks(arch.num_hidden_layers, n_blocks)):
        for shape in block_tensor_shapes(arch, layers, b == 0, b == n_blocks - 1).values():
            n = 1
            for d in shape:
                n *= d
            total += n * itemsize
    return total


# ---- safetensors bytes -------------------------------------------------------------------

def _header_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A safetensors header (length prefix included) padded so the data starts ALIGN-aligned."""
    return _header_from_specs({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})


def _header_from_specs(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> bytes:
    """The header for tensors of these dtypes and shapes, in this order (no data needed)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    codes = {v: k for k, v in _ST_DTYPES.items()}
    for name, (dtype, shape) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % ALIGN
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).reshape(-1).numpy().data


def _parse_header(mv: memoryview, where: str) -> tuple[dict[str, Any], int]:
    if len(mv) < 8:
        raise CheckpointError(f"{where}: {len(mv)} bytes is too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", mv[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(mv):
        raise CheckpointError(f"{where}: header length {hlen} exceeds the {len(mv)} bytes present (truncated or corrupt)")
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    return header, 8 + hlen


def tensors_from_block_bytes(buf: Any, where: str = "block bytes") -> dict[str, torch.Tensor]:
    """Parse a block held in memory into named tensors that *share* its memory (no copy).

    ``buf`` is a writable bytes-like object (bytearray, memoryview, numpy uint8 array) or a 1-D
    ``torch.uint8`` tensor (e.g. a slice of the pinned host pool or of GPU memory: the tensors
    returned then live on that device). Read-only buffers (``bytes``) are copied once. The
    caller must keep ``buf`` alive and unmodified while the tensors are in use.
    """
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise CheckpointError(f"{where}: expected a 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
        head = buf[: min(len(buf), 8)].cpu().numpy().tobytes()
        if len(head) < 8:
            raise CheckpointError(f"{where}: {len(buf)} bytes is too short for a safetensors header")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > len(buf):
            raise CheckpointError(f"{where}: header length {hlen} exceeds the {len(buf)} bytes present (truncated or corrupt)")
        header, start = _parse_header(memoryview(buf[: 8 + hlen].cpu().numpy().tobytes()), where)
        total = len(buf)
    else:
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            mv = memoryview(bytearray(mv))
        header, start = _parse_header(mv, where)
        total = len(mv)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            s, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry {info!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for d in shape:
            numel *= d
        if e - s != numel * itemsize or start + e > total or s < 0:
            raise CheckpointError(
                f"{where}: tensor {name!r} byte range [{s}, {e}) does not fit shape {shape} or the {total - start} data bytes"
            )
        off = start + s
        if isinstance(buf, torch.Tensor):
            if off % itemsize:
                raise CheckpointError(f"{where}: tensor {name!r} is not aligned for {dtype}")
            t = buf[off : off + numel * itemsize].view(dtype).view(shape)
        elif numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(mv, dtype=dtype, count=numel, offset=off).view(shape)
        out[name] = t
    return out


# ---- chunk I/O --------------------------------------------------------------------------

def chunk_ranges(nbytes: int, n: int) -> list[tuple[int, int]]:
    """(offset, length) of ``n`` equal-byte chunks tiling a ``nbytes``-byte stream (``c*T//K``)."""
    if n <= 0:
        raise ValueError(f"chunk count must be positive, got {n}")
    try:
        bounds = equal_chunk_bounds(nbytes, n)
    except LayoutError:
        raise CheckpointError(f"cannot cut a {nbytes}-byte model into {n} chunks") from None
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def verify_chunk(data: Any, chunk: ChunkEntry, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``data`` hashes to the chunk's xxh64."""
    check_digest(xxhash.xxh64(data).hexdigest(), chunk, where)


def check_digest(got: str, chunk: ChunkEntry, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` and the chunk unless ``got`` is its xxh64."""
    if got != chunk.xxh64:
        raise CheckpointError(
            f"{where}: chunk {chunk.index} (stream bytes {chunk.offset}..{chunk.end}) is corrupted: "
            f"xxh64 {got} != manifest {chunk.xxh64}"
        )


def read_exact_into(fd: int, view: memoryview, offset: int, where: str) -> None:
    """``pread`` exactly ``len(view)`` bytes at ``offset`` into ``view``; a short read is an error."""
    got = 0
    n = len(view)
    while got < n:
        r = os.preadv(fd, [view[got:]], offset + got)
        if r <= 0:
            raise CheckpointError(f"{where}: truncated: read stopped at byte {offset + got}, expected {offset + n}")
        got += r


def _write_all(fd: int, data: memoryview | bytes, where: Path) -> int:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        try:
            w = os.write(fd, mv[done:])
        except OSError as e:
            raise CheckpointError(f"{where}: write failed after {done} bytes: {e.strerror}") from None
        if w <= 0:
            raise CheckpointError(f"{where}: short write ({done} of {len(mv)} bytes)")
        done += w
    return done


class StreamHasher:
    """xxh64 of each chunk of a stream cut at fixed boundaries, fed in order across files."""

    def __init__(self, total: int, n_chunks: int) -> None:
        self.ranges = chunk_ranges(total, n_chunks)
        self._hashers = [xxhash.xxh64() for _ in self.ranges]
        self._ci = 0
        self.pos = 0

    def feed(self, mv: memoryview | bytes) -> None:
        mv = memoryview(mv).cast("B")
        i = 0
        while i < len(mv):
            off, ln = self.ranges[self._ci]
            take = min(len(mv) - i, off + ln - self.pos)
            if take <= 0:
                raise CheckpointError(f"stream longer than the {self.ranges[-1][0] + self.ranges[-1][1]} bytes planned")
            self._hashers[self._ci].update(mv[i : i + take])
            i += take
            self.pos += take
            if self.pos == off + ln and self._ci + 1 < len(self.ranges):
                self._ci += 1

    def chunks(self) -> list[ChunkEntry]:
        """The chunk entries (stream offsets); the whole stream must have been fed."""
        total = self.ranges[-1][0] + self.ranges[-1][1]
        if self.pos != total:
            raise CheckpointError(f"stream ended at byte {self.pos}, expected {total}")
        return [ChunkEntry(index=i, offset=o, length=ln, xxh64=h.hexdigest())
                for i, ((o, ln), h) in enumerate(zip(self.ranges, self._hashers))]


def write_block_file(path: Path, tensors: Mapping[str, torch.Tensor], hasher: StreamHasher) -> int:
    """Write one block file, feeding its bytes to the model's chunk hasher; fsync before returning."""
    header = _header_bytes(tensors)
    total = len(header) + sum(t.numel() * t.element_size() for t in tensors.values())
    pos = 0

    def feed(mv: memoryview) -> None:
        nonlocal pos
        hasher.feed(mv)
        pos += len(mv)

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create: {e.strerror}") from None
    try:
        for piece in [memoryview(header)] + [_tensor_bytes(t) for t in tensors.values()]:
            feed(piece)
            _write_all(fd, piece, path)
        os.fsync(fd)
    finally:
        os.close(fd)
    if pos != total or os.path.getsize(path) != total:
        raise CheckpointError(f"{path}: wrote {os.path.getsize(path)} bytes, expected {total}")
    return total


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
) -> Checkpoint:
    """Write a model in our format, atomically: temp dir, fsynced files, one rename.

    ``block_source(b, layers)`` is called once per block, so only one block's tensors are in
    memory at a time. Every tensor is checked against the names and shapes the arch implies and
    cast to ``dtype``. The model gets ``K = blocks x chunks_per_block`` equal-byte transfer chunks
    over its whole stream (format version 2). ``progress(tensor_bytes)`` is called after each block file is written
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
        head = _header_from_specs({k: (tdtype, v) for k, v in shapes.items()})
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
            blocks.append(BlockEntry(index=b, layers=layers, file=fname, offset=offset, nbytes=nbytes))
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
                    _write_all(fd, data, p)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                tok_names.append(fname)
        manifest = Manifest(
            format_version=FORMAT_VERSION, name=name, arch=arch, dtype=dtype,
            tokenizer_files=sorted(tok_names), source=source, blocks=blocks, chunks=hasher.chunks(),
        )
        mpath = tmp / MANIFEST_NAME
        fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, manifest.model_dump_json(indent=1).encode(), mpath)
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
