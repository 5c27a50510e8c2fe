"""The manifest of a checkpoint in our block format.

A model directory holds ``manifest.json``, one safetensors file per execution block
(``block_{b:03d}.safetensors``) and ``tokenizer/``. The manifest is the single description every
part of the system uses to size, read, send and verify a model.

Format version 2 (written now). The model's *byte stream* is the concatenation of its block files
in block order; block ``b`` sits at stream ``offset`` (the sum of earlier blocks' ``nbytes``).
Blocks are the unit of execution (layer ranges, one safetensors file each); *chunks* are the unit
of transfer and verification: a model-level list of equal-byte ranges of the stream,
``[c*T//K, (c+1)*T//K)`` for total ``T`` and ``K`` chunks, each with its xxh64. A chunk may span
a block boundary and a large block spans several chunks (equal chunks are what the multicast's
``(k - 1 + log2 n) / k`` bound assumes; chunks that tiled blocks made an embedding-heavy block's
chunks 4x the others). :attr:`Manifest.layout` is the pure
:class:`~lambdascale.pipe.layout.ChunkLayout` every consumer maps chunks to blocks with.

Version 1 (still read): each block listed its own chunks (byte ranges of its file, chunk ``c`` in
block ``c * B // K``). Shifted by the block's offset they already tile the stream, so a v1
manifest is converted on read (``format_version`` becomes 2) and existing model caches keep
working without a re-import.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch
from lambdascale.model.generation import GenerationDefaults
from lambdascale.pipe.layout import ChunkLayout

FORMAT = "lambdascale-blocks"
#: Bump when the on-disk layout changes; readers refuse other versions with a clear error.
FORMAT_VERSION = 2
#: Versions :func:`read_manifest` accepts (older ones are converted to the current one on read).
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"


class DType(str, Enum):
    """Storage dtype of every tensor in a checkpoint."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.FLOAT32 else 2

    @property
    def safetensors_code(self) -> str:
        return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[self.value]


def block_file_name(b: int) -> str:
    """File name of execution block ``b`` inside a model directory."""
    return f"block_{b:03d}.safetensors"


class ChunkEntry(BaseModel):
    """One transfer chunk: a byte range of the model's stream and its xxh64 (16 hex digits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, description="global chunk index over the whole model")
    offset: int = Field(ge=0, description="byte offset in the model's stream (block files concatenated)")
    length: int = Field(gt=0, description="bytes in this chunk")
    xxh64: str = Field(pattern=r"^[0-9a-f]{16}$", description="xxh64 of the chunk's bytes, hex")

    @property
    def end(self) -> int:
        return self.offset + self.length


class TensorEntry(BaseModel):
    """One tensor of a block file: its dtype, shape and byte range in the file, and what it was
    converted from (``source_dtype``: the checkpoint's stored type, e.g. ``Q4_K``, ``F8_E4M3``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int = Field(gt=0, description="byte offset in the block file (after the header)")
    nbytes: int = Field(ge=0)
    source_dtype: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class BlockEntry(BaseModel):
    """One execution block: its layer range, file, and place in the model's stream.

    ``tensors`` (written since issue 17; empty in older manifests) lists every tensor with its
    dtype; they tile the file's data section in order, so the block stays one contiguous range.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    layers: tuple[int, int] = Field(description="[start, end) decoder layers held by this block")
    file: str
    offset: int = Field(ge=0, description="byte offset of this block's file in the model's stream")
    nbytes: int = Field(gt=0, description="size of the block file, header included")
    tensors: tuple[TensorEntry, ...] = ()

    @model_validator(mode="after")
    def _tiled(self) -> "BlockEntry":
        if self.tensors:
            pos = self.tensors[0].offset
            for t in self.tensors:
                if t.offset != pos:
                    raise ValueError(f"tensor {t.name} starts at byte {t.offset}, expected {pos} (tensors must tile the block)")
                pos = t.end
            if pos != self.nbytes:
                raise ValueError(f"tensors end at byte {pos}, the block file has {self.nbytes}")
        return self

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest dict as version 2: per-block chunks shifted by the block's offset."""
    out = dict(data)
    blocks, chunks = [], []
    pos = 0
    for i, blk in enumerate(data.get("blocks") or []):
        if not isinstance(blk, dict):
            raise ValueError(f"blocks.{i}: not an object")
        blk = dict(blk)
        per = blk.pop("chunks", None)
        if not isinstance(per, list) or not per:
            raise ValueError(f"blocks.{i}.chunks: a version-1 block needs a non-empty chunk list")
        for j, ch in enumerate(per):
            if not isinstance(ch, dict) or not isinstance(ch.get("offset"), int):
                raise ValueError(f"blocks.{i}.chunks.{j}: malformed chunk {ch!r}")
            chunks.append({**ch, "offset": ch["offset"] + pos})
        blk["offset"] = pos
        nbytes = blk.get("nbytes")
        if not isinstance(nbytes, int):
            raise ValueError(f"blocks.{i}.nbytes: missing or not an integer")
        pos += nbytes
        blocks.append(blk)
    out.update(format_version=FORMAT_VERSION, blocks=blocks, chunks=chunks)
    return out


class Manifest(BaseModel):
    """``manifest.json`` of a model in our block format (version 2; version 1 dicts convert)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    arch: ModelArch
    dtype: DType
    tokenizer_files: list[str] = Field(
        default_factory=list, description="files under tokenizer/ (tokenizer.json, tokenizer_config.json, ...)"
    )
    source: str = Field(default="", description="what the model was imported from")
    generation: GenerationDefaults | None = Field(
        default=None, description="the checkpoint's own generation defaults, read at import "
        "(model/generation.py); None: imported before they were recorded (the next import records them)")
    blocks: list[BlockEntry] = Field(min_length=1)
    chunks: list[ChunkEntry] = Field(min_length=1, description="transfer chunks tiling the model's stream, in order")
    _layout: ChunkLayout | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _convert_v1(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format_version") == 1:
            return _upgrade_v1(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not {FORMAT_VERSION}")
        expect_layer = 0
        pos = 0
        for i, blk in enumerate(self.blocks):
            if blk.index != i:
                raise ValueError(f"blocks.{i}.index is {blk.index}, expected {i}")
            if blk.layers[0] != expect_layer or blk.layers[1] <= blk.layers[0]:
                raise ValueError(f"blocks.{i}.layers is {list(blk.layers)}, expected to start at {expect_layer}")
            if blk.offset != pos:
                raise ValueError(f"blocks.{i}.offset is {blk.offset}, expected {pos} (the sum of earlier blocks' nbytes)")
            expect_layer = blk.layers[1]
            pos += blk.nbytes
        if expect_layer != self.arch.num_hidden_layers:
            raise ValueError(f"blocks cover {expect_layer} layers, the arch has {self.arch.num_hidden_layers}")
        cpos = 0
        for c, ch in enumerate(self.chunks):
            if ch.index != c:
                raise ValueError(f"chunks.{c}.index is {ch.index}, expected {c}")
            if ch.offset != cpos:
                raise ValueError(f"chunks.{c}.offset is {ch.offset}, expected {cpos} (chunks must tile the stream in order)")
            cpos += ch.length
        if cpos != pos:
            raise ValueError(f"chunks cover {cpos} bytes but the blocks total {pos}")
        self._layout = ChunkLayout(
            tuple(b.offset for b in self.blocks) + (pos,), tuple(ch.offset for ch in self.chunks) + (pos,)
        )
        return self

    @property
    def layout(self) -> ChunkLayout:
        """Which chunks overlap which block (stream byte offsets), for planners and agents."""
        assert self._layout is not None
        return self._layout

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def chunk_lengths(self) -> list[int]:
        """Byte length of every chunk, in global chunk order."""
        return [ch.length for ch in self.chunks]

    def chunk(self, c: int) -> ChunkEntry:
        """Global chunk ``c``."""
        if not 0 <= c < len(self.chunks):
            raise IndexError(f"{self.name}: chunk {c} outside 0..{len(self.chunks) - 1}")
        return self.chunks[c]

    def chunks_of_block(self, b: int) -> range:
        """Every chunk overlapping block ``b`` (what must be verified before the block is used)."""
        return self.layout.chunks_of_block(b)

    def blocks_of_chunk(self, c: int) -> range:
        """Every block chunk ``c`` overlaps (two when it spans a block boundary)."""
        return self.layout.blocks_of_chunk(c)

    def chunk_parts(self, c: int) -> list[tuple[int, int, int]]:
        """Where chunk ``c``'s bytes lie in the block files, in stream order: (block, offset in
        that block's file, length), one part per block it overlaps."""
        ch = self.chunk(c)
        parts = []
        for b in self.blocks_of_chunk(c):
            blk = self.blocks[b]
            s, e = max(ch.offset, blk.offset), min(ch.end, blk.end)
            parts.append((b, s - blk.offset, e - s))
        return parts


def record_generation(model_dir: str | Path, generation: GenerationDefaults) -> Manifest:
    """Rewrite ``<model_dir>/manifest.json`` with ``generation`` recorded (atomically: temp file, rename)."""
    import os

    m = read_manifest(model_dir).model_copy(update={"generation": generation})
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(m.model_dump_json(indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot record generation defaults: {e.strerror}") from None
    return m


def read_manifest(model_dir: str | Path) -> Manifest:
    """Read and validate ``<model_dir>/manifest.json``.

    Raises :class:`CheckpointError` naming the file when it is missing, not JSON, of another
    format or format version, or inconsistent (chunks that do not tile the stream, block offsets
    that are not the running sum of sizes, layers that do not cover the model, an architecture we
    do not support). A version-1 manifest is converted to version 2 on read.
    """
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest (not a lambdascale model directory, or an import was interrupted)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read manifest: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if version not in READ_VERSIONS:
        raise CheckpointError(
            f"{path}: unknown format_version {version!r}; this lambdascale reads versions {list(READ_VERSIONS)} "
            f"(re-import the model with `lambdascale import ... --force`)"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: invalid manifest:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise CheckpointError("\n".join(lines)) from None
