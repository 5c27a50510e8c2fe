"""Checkpoint format: round trip, chunk layout, zero-copy parsing, atomic writes, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lambdascale.errors import CheckpointError, ModelNotFoundError
from lambdascale.model.arch import SHAPES, plan_blocks
from lambdascale.model.blockfile import block_tensor_shapes, chunk_ranges, tensors_from_block_bytes
from lambdascale.model.checkpoint import Checkpoint, find_model, list_models, write_checkpoint
from lambdascale.model.importers import import_model
from lambdascale.model.importers.synthetic import synthetic_block_source
from lambdascale.model.manifest import MANIFEST_NAME, read_manifest

import xxhash


@pytest.fixture()
def tiny(tmp_path: Path) -> Checkpoint:
    return import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=3)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama3"])
def test_round_trip_every_family(tmp_path: Path, shape: str) -> None:
    arch = SHAPES[shape]
    ck = import_model(f"synthetic:{shape}", tmp_path, n_blocks=2, chunks_per_block=2)
    m = ck.manifest
    assert m.n_blocks == 2 and m.n_chunks == 4 and m.arch == arch
    src = synthetic_block_source(arch, 2)
    for b, layers in enumerate(plan_blocks(arch.num_hidden_layers, 2)):
        ours = ck.block_tensors(b)
        expected = block_tensor_shapes(arch, layers, b == 0, b == 1)
        assert list(ours) == list(expected)
        ref = load_file(str(ck.block_path(b)))  # the standard safetensors reader agrees
        want = src(b, layers)
        for k, shape_ in expected.items():
            assert tuple(ours[k].shape) == shape_
            assert torch.equal(ours[k], ref[k])
            assert torch.equal(ours[k], want[k].to(ours[k].dtype))
    if arch.tie_word_embeddings:
        assert torch.equal(ck.block_tensors(1)["lm_head.weight"], ck.block_tensors(0)["model.embed_tokens.weight"])


def test_chunks_are_equal_byte_ranges_of_the_stream(tiny: Checkpoint) -> None:
    m = tiny.manifest
    K, B, T = m.n_chunks, m.n_blocks, m.total_bytes
    assert (K, m.format_version) == (12, 2)
    stream = b"".join(tiny.block_path(b).read_bytes() for b in range(B))
    assert len(stream) == T
    pos = 0
    for blk in m.blocks:
        assert (blk.offset, os.path.getsize(tiny.block_path(blk.index))) == (pos, blk.nbytes)
        pos += blk.nbytes
    for c, ch in enumerate(m.chunks):
        assert (ch.index, ch.offset, ch.end) == (c, c * T // K, (c + 1) * T // K)
        assert xxhash.xxh64(stream[ch.offset : ch.end]).hexdigest() == ch.xxh64
        assert m.chunk(c) == ch
        for b in m.blocks_of_chunk(c):
            assert c in m.chunks_of_block(b)
    # the tiny model's blocks are uneven (embedding in block 0), so some chunk spans a boundary
    assert any(len(m.blocks_of_chunk(c)) == 2 for c in range(K))
    assert m.layout.chunk_lengths() == m.chunk_lengths()


def _as_v1(ck: Checkpoint, per_block: int) -> dict:
    """The old (version 1) manifest of the same files: chunks tile each block file."""
    data = json.loads((ck.dir / MANIFEST_NAME).read_text())
    data["format_version"] = 1
    data.pop("chunks")
    c = 0
    for blk in data["blocks"]:
        blk.pop("offset")
        raw = ck.block_path(blk["index"]).read_bytes()
        n = blk["nbytes"]
        chunks = []
        for i in range(per_block):
            a, e = n * i // per_block, n * (i + 1) // per_block
            chunks.append({"index": c, "offset": a, "length": e - a, "xxh64": xxhash.xxh64(raw[a:e]).hexdigest()})
            c += 1
        blk["chunks"] = chunks
    return data


def test_version_1_manifest_is_converted_on_read(tiny: Checkpoint) -> None:
    v1 = _as_v1(tiny, 2)
    (tiny.dir / MANIFEST_NAME).write_text(json.dumps(v1))
    ck = Checkpoint(tiny.dir)
    m = ck.manifest
    assert (m.format_version, m.n_chunks) == (2, 8)
    assert m.layout.is_uniform()  # two chunks per block file: the old c*B//K rule
    for b, blk in enumerate(v1["blocks"]):
        assert m.blocks[b].offset == sum(x["nbytes"] for x in v1["blocks"][:b])
        assert list(m.chunks_of_block(b)) == [ch["index"] for ch in blk["chunks"]]
        for ch in blk["chunks"]:
            assert m.chunk(ch["index"]).offset == m.blocks[b].offset + ch["offset"]
    for b in range(m.n_blocks):
        assert ck.read_block(b) == tiny.read_block(b)
    # a corrupt v1 chunk is still caught, named by file and chunk
    with open(ck.block_path(1), "r+b") as f:
        f.seek(5)
        x = f.read(1)
        f.seek(5)
        f.write(bytes([x[0] ^ 1]))
    with pytest.raises(CheckpointError, match=r"block_001\.safetensors: chunk 2 .*corrupted"):
        ck.read_block(1)
    bad = json.loads(json.dumps(v1))
    del bad["blocks"][0]["chunks"]
    (tiny.dir / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.chunks: a version-1 block needs a non-empty chunk list"):
        read_manifest(tiny.dir)


def test_chunk_ranges_tile() -> None:
    for n, k in [(10, 3), (100_000, 7), (4096 * 5 + 3, 5)]:
        rs = chunk_ranges(n, k)
        assert rs[0][0] == 0 and sum(l for _, l in rs) == n
        assert all(a + l == b for (a, l), (b, _) in zip(rs, rs[1:]))
        assert max(l for _, l in rs) - min(l for _, l in rs) <= 1
    with pytest.raises(CheckpointError, match="cannot cut"):
        chunk_ranges(3, 5)


def test_tensors_from_block_bytes_shares_memory(tiny: Checkpoint) -> None:
    buf = tiny.read_block(0)
    t = tensors_from_block_bytes(buf)
    w = t["model.embed_tokens.weight"]
    before = w[0, 0].item()
    # find the tensor's bytes in the buffer and change them: the tensor must see it (no copy)
    w[0, 0] = before + 1.0
    again = tensors_from_block_bytes(buf)["model.embed_tokens.weight"]
    assert again[0, 0].item() == w[0, 0].item() != before
    # a uint8 torch tensor (e.g. a pool slice) works the same way, also without copying
    tb = torch.frombuffer(buf, dtype=torch.uint8)
    tt = tensors_from_block_bytes(tb)
    assert tt["model.embed_tokens.weight"].data_ptr() == w.data_ptr()
    # read-only bytes are accepted (copied once)
    tr = tensors_from_block_bytes(bytes(buf))
    assert torch.equal(tr["model.embed_tokens.weight"], w)


def test_tensors_from_block_bytes_rejects_garbage(tiny: Checkpoint) -> None:
    buf = tiny.read_block(1)
    with pytest.raises(CheckpointError, match="exceeds"):
        tensors_from_block_bytes(buf[:100], where="blk1")
    with pytest.raises(CheckpointError, match="does not fit"):
        tensors_from_block_bytes(buf[: len(buf) - 8], where="blk1")
    with pytest.raises(CheckpointError, match="too short"):
        tensors_from_block_bytes(bytearray(4))


def test_truncated_block_file_is_named(tiny: Checkpoint) -> None:
    p = tiny.block_path(2)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match=r"block_002\.safetensors.*truncated"):
        tiny.read_block(2)
    tiny.read_block(1)  # other blocks unaffected


def test_corrupted_chunk_is_never_used(tiny: Checkpoint) -> None:
    m = tiny.manifest
    blk = m.blocks[2]
    ch = m.chunk(m.chunks_of_block(2)[-1])
    at = max(ch.offset, blk.offset) - blk.offset  # first byte of that chunk inside block 2's file
    p = tiny.block_path(2)
    with open(p, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"block_002\.safetensors: chunk {ch.index} .*corrupted"):
        tiny.read_block(2)
    with pytest.raises(CheckpointError, match="corrupted"):
        tiny.block_tensors(2)


def test_spanning_chunk_is_verified_from_both_files(tiny: Checkpoint) -> None:
    """A chunk spanning blocks b and b+1: corrupting its part in b+1 fails reading b too."""
    m = tiny.manifest
    c = next(c for c in range(m.n_chunks) if len(m.blocks_of_chunk(c)) == 2)
    b0, b1 = m.blocks_of_chunk(c)
    with open(tiny.block_path(b1), "r+b") as f:  # the chunk's first byte in b1's file is byte 0
        x = f.read(1)
        f.seek(0)
        f.write(bytes([x[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"block_{b0:03d}\.safetensors: chunk {c} .*corrupted"):
        tiny.read_block(b0)
    with pytest.raises(CheckpointError, match=rf"block_{b1:03d}\.safetensors: chunk {c} .*corrupted"):
        tiny.read_block(b1)


def test_unknown_format_version(tiny: Checkpoint) -> None:
    mp = tiny.dir / MANIFEST_NAME
    data = json.loads(mp.read_text())
    data["format_version"] = 99
    mp.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest\.json: unknown format_version 99"):
        Checkpoint(tiny.dir)


def test_inconsistent_manifest_is_rejected(tiny: Checkpoint) -> None:
    mp = tiny.dir / MANIFEST_NAME
    data = json.loads(mp.read_text())
    good = json.loads(json.dumps(data))
    data["chunks"][3]["length"] += 1
    mp.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"invalid manifest:\n.*chunks\.4\.offset is \d+, expected \d+"):
        read_manifest(tiny.dir)
    data = json.loads(json.dumps(good))
    data["blocks"][2]["offset"] += 8
    mp.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"blocks\.2\.offset is \d+, expected \d+"):
        read_manifest(tiny.dir)
    data = json.loads(json.dumps(good))
    data["chunks"][-1]["length"] += 1
    mp.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"chunks cover \d+ bytes but the blocks total \d+"):
        read_manifest(tiny.dir)


def test_missing_tokenizer_is_named(tiny: Checkpoint) -> None:
    (tiny.dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer file\(s\): tokenizer\.json"):
        tiny.tokenizer_dir


def test_crash_mid_write_leaves_nothing_that_looks_whole(tmp_path: Path) -> None:
    arch = SHAPES["tiny-llama"]
    inner = synthetic_block_source(arch, 4)

    def failing(b: int, layers: tuple[int, int]):
        if b == 2:
            raise RuntimeError("simulated crash")
        return inner(b, layers)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_checkpoint(tmp_path, "m", arch, "float32", failing, n_blocks=4)
    assert list(tmp_path.iterdir()) == []
    assert list_models(tmp_path) == []
    with pytest.raises(ModelNotFoundError):
        find_model(tmp_path, "m")


def test_write_rejects_wrong_shapes(tmp_path: Path) -> None:
    arch = SHAPES["tiny-llama"]
    inner = synthetic_block_source(arch, 2)

    def bad(b: int, layers: tuple[int, int]):
        out = dict(inner(b, layers))
        out["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        return out

    with pytest.raises(CheckpointError, match=r"up_proj\.weight has shape \(3, 3\)"):
        write_checkpoint(tmp_path, "m", arch, "float32", bad, n_blocks=2)


def test_models_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"models directory .*file/models cannot be created"):
        import_model("synthetic:tiny-llama", f / "models")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_models_dir_not_writable(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="not writable"):
            import_model("synthetic:tiny-llama", d)
    finally:
        d.chmod(0o700)


def test_models_dir_not_writable_as_reported_by_os(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root bypasses permission bits, so emulate a read-only directory through os.access too.
    import lambdascale.model.checkpoint as ckmod

    real = os.access
    monkeypatch.setattr(ckmod.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(CheckpointError, match=rf"models directory {tmp_path} is not writable"):
        import_model("synthetic:tiny-llama", tmp_path)


def test_find_model_lists_what_exists(tiny: Checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="models there: synthetic-tiny-llama"):
        find_model(tmp_path, "nope")
    assert find_model(tmp_path, "synthetic-tiny-llama").manifest == tiny.manifest


def test_import_is_cached_unless_forced(tmp_path: Path) -> None:
    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=2)
    mtime = (ck.dir / MANIFEST_NAME).stat().st_mtime_ns
    again = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4)
    assert again.manifest.n_blocks == 2 and (ck.dir / MANIFEST_NAME).stat().st_mtime_ns == mtime
    forced = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, force=True)
    assert forced.manifest.n_blocks == 4
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic-tiny-llama"]


def test_synthetic_layers_and_unknown_shape(tmp_path: Path) -> None:
    ck = import_model("synthetic:tiny-llama", tmp_path, layers=3)
    assert ck.name == "synthetic-tiny-llama-3l" and ck.arch.num_hidden_layers == 3 and ck.manifest.n_blocks == 3
    with pytest.raises(ModelNotFoundError, match="unknown model shape 'nope'; known shapes:"):
        import_model("synthetic:nope", tmp_path)
    with pytest.raises(CheckpointError, match="--layers must be at least 1, got 0"):
        import_model("synthetic:tiny-llama", tmp_path, layers=0)
    with pytest.raises(CheckpointError, match="--blocks 9 exceeds"):
        import_model("synthetic:tiny-llama", tmp_path, n_blocks=9, name="x")


def test_bfloat16_round_trip(tmp_path: Path) -> None:
    ck = import_model("synthetic:tiny-llama", tmp_path, dtype="bfloat16", n_blocks=2)
    t = ck.block_tensors(1)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    ref = load_file(str(ck.block_path(1)))
    assert all(torch.equal(t[k], ref[k]) for k in ref)


def test_stale_temporaries_of_dead_imports_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".synthetic-tiny-llama.tmp-{dead_pid}-deadbeef"
    live = tmp_path / f".synthetic-tiny-llama.tmp-{os.getpid()}-cafef00d"
    stale.mkdir()
    live.mkdir()
    (stale / "block_000.safetensors").write_bytes(b"partial")
    import_model("synthetic:tiny-llama", tmp_path, n_blocks=2)
    assert not stale.exists() and live.exists()
    assert [m.name for m in list_models(tmp_path)] == ["synthetic-tiny-llama"]


def test_progress_reports_exactly_the_tensor_bytes(tmp_path: Path) -> None:
    from lambdascale.model.blockfile import model_tensor_bytes

    arch = SHAPES["tiny-qwen2"]
    seen: list[int] = []
    ck = write_checkpoint(tmp_path, "q", arch, "float32", synthetic_block_source(arch, 3), n_blocks=3, progress=seen.append)
    assert len(seen) == 3 and sum(seen) == model_tensor_bytes(arch, 3, 4)
    assert sum(seen) < ck.manifest.total_bytes  # headers come on top
