"""Import speed: a synthetic checkpoint of each source format converted into our block format,
against the disk's sequential read rate measured in the same run.

Formats (each source file about --size-gb, random weights of a Llama shape of hidden 2048):
  safetensors-bf16   an HF directory, bf16 weights (kept bf16)
  safetensors-fp8    an HF directory, FP8 e4m3 projections with per-channel scales (-> bf16)
  gguf-q8_0          a GGUF of Q8_0 projections (-> bf16)
  gguf-q4_k          a GGUF of Q4_K projections (-> bf16)
  gguf-q6_k          a GGUF of Q6_K projections (-> bf16)

Disk rate: a file of the same size, written, fsynced, evicted from the page cache
(posix_fadvise DONTNEED), read sequentially in 16 MiB reads. Before each import its source is
evicted the same way; the import writes and fsyncs its block files (what `lambdascale import`
does), so the disk's sequential write rate (fsynced, also measured) bounds it as well. Rate =
source bytes / import seconds; the issue asks for at least half the disk read rate.

Usage: python bench/bench_import.py [--size-gb 1.0] [--dir /tmp] [--formats a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lambdascale.model.importers import import_model
from lambdascale.model.importers.tokenizer import synthetic_tokenizer_files

H, FF, HEADS, VOCAB = 2048, 5632, 16, 32000
FORMATS = ("safetensors-bf16", "safetensors-fp8", "gguf-q8_0", "gguf-q4_k", "gguf-q6_k")


def evict(paths: list[Path]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_of(p: Path) -> list[Path]:
    return [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())


def disk_rates(d: Path, nbytes: int) -> tuple[float, float]:
    """GB/s of a sequential write (fsynced) and of a cold sequential read of an ``nbytes`` file."""
    f = d / "seq.bin"
    chunk = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(f, "wb") as fh:
        for _ in range(max(1, nbytes // len(chunk))):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    write = f.stat().st_size / (time.perf_counter() - t0) / 1e9
    evict([f])
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    total = 0
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            total += n
    dt = time.perf_counter() - t0
    f.unlink()
    return write, total / dt / 1e9


def layers_for(size: int, bytes_per_param: float) -> int:
    per_layer = (4 * H * H + 3 * H * FF) * bytes_per_param
    return max(1, int((size - 2 * VOCAB * H * 2) / per_layer))


def _tokenizer(d: Path) -> None:
    for name, data in synthetic_tokenizer_files(VOCAB, 1, 2, 4096).items():
        (d / name).write_bytes(data)


def _config(layers: int, **extra: object) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": H,
            "intermediate_size": FF, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "torch_dtype": "bfloat16", **extra}


def make_safetensors(d: Path, size: int, fp8: bool) -> None:
    from safetensors.torch import save_file

    d.mkdir()
    layers = layers_for(size, 1.0 if fp8 else 2.0)
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
              "self_attn.o_proj": (H, H), "mlp.gate_proj": (FF, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}
    index: dict[str, str] = {}
    shard = {"model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g).to(torch.bfloat16) * 0.02,
             "lm_head.weight": torch.randn(VOCAB, H, generator=g).to(torch.bfloat16) * 0.02,
             "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    save_file(shard, str(d / "model-embed.safetensors"))
    index.update({k: "model-embed.safetensors" for k in shard})
    for i in range(layers):
        p = f"model.layers.{i}."
        t: dict[str, torch.Tensor] = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                                      p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}
        for k, shape in shapes.items():
            w = torch.randn(shape, generator=g) * 0.02
            if fp8:
                scale = w.abs().amax(dim=1, keepdim=True) / 448.0
                t[p + k + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
                t[p + k + ".weight_scale"] = scale
            else:
                t[p + k + ".weight"] = w.to(torch.bfloat16)
        name = f"model-{i:05d}.safetensors"
        save_file(t, str(d / name))
        index.update({k: name for k in t})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    extra = {"quantization_config": {"quant_method": "fbgemm_fp8"}} if fp8 else {}
    (d / "config.json").write_text(json.dumps(_config(layers, **extra)))
    _tokenizer(d)


def make_gguf(path: Path, size: int, qtype: str) -> None:
    import gguf

    per, bsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    layers = layers_for(size, bsize / per)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(H)
    w.add_block_count(layers)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_context_length(4096)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"x{i}" for i in range(3, VOCAB)])
    w.add_token_merges(["t 0"])
    rng = np.random.default_rng(0)
    qt = gguf.GGMLQuantizationType[qtype]

    def blocks(rows: int, cols: int) -> np.ndarray:
        raw = rng.integers(0, 256, (rows * cols // per, bsize), dtype=np.uint8)
        scale = rng.normal(0, 0.01, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
        if qtype == "Q6_K":
            raw[:, 208:210] = scale[:, :2]
        else:
            raw[:, :2] = scale[:, :2]
        return raw.reshape(rows, cols // per * bsize)

    w.add_tensor("token_embd.weight", blocks(VOCAB, H), raw_dtype=qt)
    w.add_tensor("output.weight", blocks(VOCAB, H), raw_dtype=qt)
    w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
    shapes = {"attn_q": (H, H), "attn_k": (H, H), "attn_v": (H, H), "attn_output": (H, H),
              "ffn_gate": (FF, H), "ffn_up": (FF, H), "ffn_down": (H, FF)}
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, dtype=np.float32))
        for k, (r, c) in shapes.items():
            w.add_tensor(f"blk.{i}.{k}.weight", blocks(r, c), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (on the disk to measure)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = int(args.size_gb * 1e9)
    root = Path(tempfile.mkdtemp(prefix="bench-import-", dir=args.dir))
    results: dict[str, object] = {"size_gb": args.size_gb, "threads": torch.get_num_threads()}
    try:
        write, disk = disk_rates(root, size)
        results["disk_read_GBps"], results["disk_write_GBps"] = disk, write
        print(f"disk sequential read (cold): {disk:.2f} GB/s; sequential write + fsync: {write:.2f} GB/s")
        for fmt in args.formats.split(","):
            src = root / (fmt + (".gguf" if fmt.startswith("gguf") else ""))
            if fmt.startswith("gguf"):
                make_gguf(src, size, fmt.split("-")[1].upper())
            else:
                make_safetensors(src, size, fp8=fmt.endswith("fp8"))
            nbytes = sum(f.stat().st_size for f in files_of(src))
            evict(files_of(src))
            t0 = time.perf_counter()
            ck = import_model(str(src), root / "models", name=fmt, dtype="bfloat16", force=True)
            dt = time.perf_counter() - t0
            rate = nbytes / dt / 1e9
            out_bytes = ck.manifest.total_bytes
            results[fmt] = {"source_GB": nbytes / 1e9, "out_GB": out_bytes / 1e9, "seconds": dt, "GBps": rate,
                            "of_disk": rate / disk}
            print(f"{fmt:18s} source {nbytes / 1e9:5.2f} GB -> {out_bytes / 1e9:5.2f} GB bf16 in {dt:6.2f} s: "
                  f"{rate:5.2f} GB/s = {rate / disk:4.2f}x disk")
            shutil.rmtree(root / "models" / fmt)
            shutil.rmtree(src) if src.is_dir() else src.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
