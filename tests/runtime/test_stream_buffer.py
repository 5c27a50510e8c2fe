"""The agent's one-buffer-per-model layout, without processes: block views, missing chunks,
SSD persist and copy-back verification over the model's byte stream (format v2 chunks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.errors import LambdaScaleError
from lambdascale.model.checkpoint import Checkpoint
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.model_state import ModelState
from lambdascale.runtime.agent_memory import AgentMemory


def _stream(ck: Checkpoint) -> bytearray:
    return bytearray(b"".join(ck.block_path(b).read_bytes() for b in range(ck.manifest.n_blocks)))


def test_missing_for_blocks_follows_the_manifest_layout(tiny_model: Path) -> None:
    m = read_manifest(tiny_model)
    spanning = [c for c in range(m.n_chunks) if len(m.blocks_of_chunk(c)) == 2]
    assert spanning, "tiny-llama's uneven blocks must give a chunk spanning two blocks"
    st = ModelState(m)
    for b in range(m.n_blocks):
        assert st.missing_for_blocks(b, b + 1) == list(m.chunks_of_block(b))
    c = spanning[0]
    b0, b1 = m.blocks_of_chunk(c)
    for x in set(m.chunks_of_block(b0)) | set(m.chunks_of_block(b1)):
        if x != c:
            st.mark_held(x)
    assert st.missing_for_blocks(b0, b1 + 1) == [c]
    st.mark_held(c)  # one chunk completes two blocks
    assert st.missing_for_blocks(b0, b1 + 1) == []
    assert AgentMemory._blocks_held(m, st.held) >= {b0, b1}


def test_stream_slices_are_the_block_files_and_persist_round_trips(tiny_model: Path, tmp_path: Path) -> None:
    ck = Checkpoint(tiny_model)
    m = ck.manifest
    stream = _stream(ck)
    for b in range(m.n_blocks):
        blk = m.blocks[b]
        assert bytes(stream[blk.offset : blk.end]) == ck.block_path(b).read_bytes()
        AgentMemory.verify_block(m, b, memoryview(stream))
    mem = AgentMemory(0, 10**9, tmp_path / "ssd", 10**9)
    out = mem.write_ssd(m, memoryview(stream))
    again = Checkpoint(out)
    assert again.manifest == m
    assert all(again.read_block(b) == ck.read_block(b) for b in range(m.n_blocks))
    with pytest.raises(LambdaScaleError, match=r"stream holds 10 bytes, the manifest \d+"):
        mem.write_ssd(m, memoryview(bytearray(10)))
    # a flipped byte in a spanning chunk's second block fails the first block's verification too
    c = next(c for c in range(m.n_chunks) if len(m.blocks_of_chunk(c)) == 2)
    b0, b1 = m.blocks_of_chunk(c)
    stream[m.blocks[b1].offset] ^= 0xFF
    with pytest.raises(LambdaScaleError, match=rf"block {b0} chunk {c} fails its xxh64"):
        AgentMemory.verify_block(m, b0, memoryview(stream))
