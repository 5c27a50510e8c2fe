"""The manifest of a checkpoint in our block format.

A model directory holds ``manifest.json``, one safetensors file per execution block
(``block_{b:03d}.safetensors``) and ``tokenizer/``. The manifest is the single description every
part of the system uses to size, read, send and verify a model: for each block the layer range it
holds, its file and byte size, and its transfer chunks (byte ranges that tile the file, header
included, each with an xxh64). Chunk indices are global over the model: with K chunks and B
blocks, chunk c belongs to block ``c * B // K`` and a block's chunks are contiguous.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch

FORMAT = "lambdascale-blocks"
#: Bump when the on-disk layout changes; readers refuse other versions with a clear error.
FORMAT_VERSION = 1
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


def chunk_block(c: int, n_blocks: int, n_chunks: int) -> int:
    """The block that global chunk ``c`` belongs to (the contract: ``c * B // K``)."""
    return c * n_blocks // n_chunks


def chunks_of_block(b: int, n_blocks: int, n_chunks: int) -> range:
    """Global chunk indices of block ``b`` (contiguous, by the ``c * B // K`` rule)."""
    # smallest c with c*B//K >= b is ceil(b*K/B)
    start = -(-b * n_chunks // n_blocks)
    end = -(-(b + 1) * n_chunks // n_blocks)
    return range(start, end)


class ChunkEntry(BaseModel):
    """One transfer chunk: a byte range of a block file and its xxh64 (16 hex digits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, description="global chunk index over the whole model")
    offset: int = Field(ge=0, description="byte offset inside the block file")
    length: int = Field(gt=0, description="bytes in this chunk")
    xxh64: str = Field(pattern=r"^[0-9a-f]{16}$", description="xxh64 of the chunk's bytes, hex")


class BlockEntry(BaseModel):
    """One execution block: its layer range, file, size and chunks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    layers: tuple[int, int] = Field(description="[start, end) decoder layers held by this block")
    file: str
    nbytes: int = Field(gt=0, description="size of the block file, header included")
    chunks: list[ChunkEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _tiles(self) -> "BlockEntry":
        pos = 0
        for ch in self.chunks:
            if ch.offset != pos:
                raise ValueError(f"block {self.index}: chunk {ch.index} starts at {ch.offset}, expected {pos}")
            pos += ch.length
        if pos != self.nbytes:
            raise ValueError(f"block {self.index}: chunks cover {pos} bytes but the file has {self.nbytes}")
        return self


class Manifest(BaseModel):
    """``manifest.json`` of a model in our block format."""

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
    blocks: list[BlockEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        expect_layer = 0
        n_chunks = sum(len(b.chunks) for b in self.blocks)
        c = 0
        for i, blk in enumerate(self.blocks):
            if blk.index != i:
                raise ValueError(f"block {i} has index {blk.index}")
            if blk.layers[0] != expect_layer or blk.layers[1] <= blk.layers[0]:
                raise ValueError(f"block {i} holds layers {list(blk.layers)}, expected to start at {expect_layer}")
            expect_layer = blk.layers[1]
            for ch in blk.chunks:
                if ch.index != c:
                    raise ValueError(f"block {i}: chunk numbered {ch.index}, expected {c}")
                if chunk_block(c, len(self.blocks), n_chunks) != i:
                    raise ValueError(f"chunk {c} is in block {i} but c*B//K puts it in another block")
                c += 1
        if expect_layer != self.arch.num_hidden_layers:
            raise ValueError(f"blocks cover {expect_layer} layers, the arch has {self.arch.num_hidden_layers}")
        return self

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_chunks(self) -> int:
        return sum(len(b.chunks) for b in self.blocks)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def chunk_lengths(self) -> list[int]:
        """Byte length of every chunk, in global chunk order."""
        return [self.chunk(c).length for c in range(self.n_chunks)]

    def chunk(self, c: int) -> ChunkEntry:
        """Global chunk ``c``."""
        b = chunk_block(c, self.n_blocks, self.n_chunks)
        return self.blocks[b].chunks[c - self.blocks[b].chunks[0].index]


def read_manifest(model_dir: str | Path) -> Manifest:
    """Read and validate ``<model_dir>/manifest.json``.

    Raises :class:`CheckpointError` naming the file when it is missing, not JSON, of another
    format or format version, or inconsistent (chunks that do not tile a block, layers that do
    not cover the model, an architecture we do not support).
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
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown format_version {version!r}; this lambdascale reads version {FORMAT_VERSION} "
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
