"""One block file of a checkpoint, byte by byte: the canonical tensor names and shapes of a
block, the safetensors bytes we write (header padded to 64 bytes, every tensor aligned for
``torch.frombuffer``/``view``) and parse as zero-copy views (:func:`tensors_from_block_bytes`),
and chunk I/O: equal-byte chunk ranges, xxh64 checks, exact reads and checked writes, a hasher
that cuts a byte stream into chunks as it flows across files.

The model directory built from these files (manifest, atomic writes, reading a block with its
chunks verified, finding models) is :mod:`lambdascale.model.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
import xxhash

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch, plan_blocks
from lambdascale.model.manifest import ChunkEntry, DType
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
    """HF names and shapes of decoder layer ``i`` (weights are [out_features, in_features]).

    The features of ``arch`` decide the set: q/k norms ([head_dim]), Gemma's norms around the
    MLP, biases; an MoE layer holds its router (``mlp.gate.weight`` [E, h]) and every expert
    stacked (``mlp.experts.{gate,up}_proj`` [E, I, h], ``down_proj`` [E, h, I]), so a block keeps
    its layers' experts together and runs alone, plus the shared expert where the family has one.
    """
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
    }
    if arch.sandwich_norms:
        out[p + "pre_feedforward_layernorm.weight"] = (h,)
        out[p + "post_feedforward_layernorm.weight"] = (h,)
    moe = arch.moe
    if moe is not None and arch.is_moe_layer(i):
        e, ei = moe.num_experts, moe.expert_intermediate_size
        out[p + "mlp.gate.weight"] = (e, h)
        out[p + "mlp.experts.gate_proj"] = (e, ei, h)
        out[p + "mlp.experts.up_proj"] = (e, ei, h)
        out[p + "mlp.experts.down_proj"] = (e, h, ei)
        if moe.shared_expert_intermediate_size:
            si = moe.shared_expert_intermediate_size
            out[p + "mlp.shared_expert.gate_proj.weight"] = (si, h)
            out[p + "mlp.shared_expert.up_proj.weight"] = (si, h)
            out[p + "mlp.shared_expert.down_proj.weight"] = (h, si)
            out[p + "mlp.shared_expert_gate.weight"] = (1, h)
    else:
        out[p + "mlp.gate_proj.weight"] = (ff, h)
        out[p + "mlp.up_proj.weight"] = (ff, h)
        out[p + "mlp.down_proj.weight"] = (h, ff)
    if arch.attention_bias:
        out[p + "self_attn.q_proj.bias"] = (q,)
        out[p + "self_attn.k_proj.bias"] = (kv,)
        out[p + "self_attn.v_proj.bias"] = (kv,)
    if arch.qk_norm:
        out[p + "self_attn.q_norm.weight"] = (d,)
        out[p + "self_attn.k_norm.weight"] = (d,)
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
    return header_from_specs({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})


def header_from_specs(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> bytes:
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


def write_all(fd: int, data: memoryview | bytes, where: Path) -> int:
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
            write_all(fd, piece, path)
        os.fsync(fd)
    finally:
        os.close(fd)
    if pos != total or os.path.getsize(path) != total:
        raise CheckpointError(f"{path}: wrote {os.path.getsize(path)} bytes, expected {total}")
    return total


__all__ = [
    "ALIGN", "MAX_HEADER_BYTES", "TORCH_DTYPES", "StreamHasher", "block_tensor_shapes", "check_digest", "chunk_ranges",
    "header_from_specs", "layer_tensor_shapes", "model_tensor_bytes", "read_exact_into", "tensors_from_block_bytes",
    "verify_chunk", "write_all", "write_block_file",
]
