"""Quantized checkpoints: GGUF quant types (the imported blocks against the gguf package's own
dequantization of each tensor, bit for bit, Q/K un-permuted), FP8 e4m3 safetensors with per-tensor and per-channel scales (against a torch
reference), the manifest's per-tensor dtypes, and the errors bad quantized input gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lambdascale.errors import CheckpointError
from lambdascale.model.importers import import_model
from lambdascale.model.importers.gguf_file import unpermute_qk
from lambdascale.model.manifest import DType

QTYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``n_blocks`` blocks of ``qtype``, with finite f16 scales where the layout
    keeps them (random bytes there would be NaN/inf half the time)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    per, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)

    def f16(n: int) -> np.ndarray:
        return rng.normal(0, 0.05, (n_blocks, n)).astype(np.float16).view(np.uint8)

    if qtype in ("Q4_0", "Q8_0"):
        raw[:, :2] = f16(1)
    elif qtype in ("Q4_1", "Q4_K", "Q5_K"):
        raw[:, :4] = f16(2)
    elif qtype == "Q6_K":
        raw[:, 208:210] = f16(1)
    return raw


# one tensor kind per quant type, so one file covers them all
TENSOR_TYPES = {"token_embd.weight": "Q8_0", "attn_q.weight": "Q4_0", "attn_k.weight": "Q8_0", "attn_v.weight": "Q4_K",
                "attn_output.weight": "Q5_K", "ffn_gate.weight": "Q6_K", "ffn_up.weight": "Q4_1",
                "ffn_down.weight": "Q4_K", "output.weight": "Q6_K"}
H, FF, VOCAB, LAYERS = 256, 512, 256, 2


def write_gguf(path: Path, types: dict[str, str] = TENSOR_TYPES) -> None:
    """A 2-layer llama GGUF (hidden 256, as K-quants need) with its tensors in the given types:
    Q4_0/Q4_1/Q8_0 quantized by gguf's own quantizer, K-quants as hand-packed random blocks."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"x{i}" for i in range(3, VOCAB)])
    w.add_token_merges(["t 0"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(1)
    shapes = {"token_embd.weight": (VOCAB, H), "output.weight": (VOCAB, H), "attn_q.weight": (H, H),
              "attn_k.weight": (H // 2, H), "attn_v.weight": (H // 2, H), "attn_output.weight": (H, H),
              "ffn_gate.weight": (FF, H), "ffn_up.weight": (FF, H), "ffn_down.weight": (H, FF)}
    names = [("token_embd.weight", "token_embd.weight"), ("output.weight", "output.weight")]
    names += [(f"blk.{i}.{k}", k) for i in range(LAYERS) for k in shapes if not k.startswith(("token", "output"))]
    for i in range(LAYERS):
        for k in ("attn_norm.weight", "ffn_norm.weight"):
            w.add_tensor(f"blk.{i}.{k}", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
    for full, kind in names:
        qtype = gguf.GGMLQuantizationType[types[kind]]
        rows, cols = shapes[kind]
        if types[kind] in ("Q4_0", "Q4_1", "Q8_0"):
            data = gguf.quants.quantize((0.05 * rng.standard_normal((rows, cols))).astype(np.float32), qtype)
        else:
            per, size = gguf.GGML_QUANT_SIZES[qtype]
            data = random_blocks(types[kind], rows * cols // per, seed=len(full)).reshape(rows, cols // per * size)
        w.add_tensor(full, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_equals_gguf_dequantization(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    src = tmp_path / "tiny-k.gguf"
    write_gguf(src)
    ck = import_model(str(src), tmp_path / "models", n_blocks=2, dtype="float32")
    assert ck.name == "tiny-k"
    ours: dict[str, torch.Tensor] = {}
    for b in range(2):
        ours.update(ck.block_tensors(b))
    reader = GGUFReader(str(src))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    hf = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
    seen = set()
    for t in reader.tensors:
        kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        if kind not in TENSOR_TYPES:
            continue
        ref = gguf_dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        if kind == "attn_q.weight":
            ref = unpermute_qk(ref, 4)
        elif kind == "attn_k.weight":
            ref = unpermute_qk(ref, 2)
        ours_name = names.get(t.name) or f"model.layers.{t.name.split('.')[1]}.{hf[kind]}"
        assert torch.equal(ours[ours_name], torch.from_numpy(np.ascontiguousarray(ref))), t.name
        seen.add(t.tensor_type.name)
    assert seen == set(QTYPES)
    # the manifest records every tensor's dtype and what it was dequantized from
    entries = {e.name: e for blk in ck.manifest.blocks for e in blk.tensors}
    assert entries["model.layers.1.self_attn.attn_output.weight".replace("attn_output", "o_proj")].source_dtype == "Q5_K"
    assert entries["model.layers.0.mlp.gate_proj.weight"].source_dtype == "Q6_K"
    assert entries["model.norm.weight"].source_dtype == "F32"
    assert all(e.dtype is DType.FLOAT32 for e in entries.values())


def test_gguf_quant_type_we_do_not_read_names_file_tensor_and_type(tmp_path: Path) -> None:
    import gguf  # IQ2_XXS (66 bytes per 256 values) has no quantizer in gguf: raw zero blocks

    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    for k, v in [("embedding_length", H), ("block_count", 1), ("feed_forward_length", FF), ("head_count", 4)]:
        getattr(w, f"add_{k}")(v)
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((H, H // 256 * 66), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"iq2\.gguf: tensor blk\.0\.ffn_down\.weight has GGUF quant type IQ2_XXS"):
        import_model(str(tmp_path / "iq2.gguf"), tmp_path / "models")
    assert not (tmp_path / "models" / "iq2").exists()


def _fp8_dir(tmp_path: Path, quant: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved by transformers, its projections rewritten as FP8 e4m3 with scales:
    per tensor for attention, per output channel for the MLP. Returns the dir and the
    bfloat16 reference of every rewritten weight."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lambdascale.model.importers.tokenizer import synthetic_tokenizer_files

    d = tmp_path / "fp8"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    out, ref = {}, {}
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            per_channel = ".mlp." in k
            amax = v.abs().amax(dim=1, keepdim=True) if per_channel else v.abs().max()
            scale = (amax / 448.0).to(torch.float32)
            w8 = (v / scale).to(torch.float8_e4m3fn)
            out[k], out[k.removesuffix(".weight") + ".weight_scale"] = w8, scale
            s = scale.reshape(-1, 1) if per_channel else scale
            ref[k] = (w8.to(torch.float32) * s).to(torch.bfloat16)
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(cfg))
    for name, data in synthetic_tokenizer_files(256, 1, 2, 256).items():
        (d / name).write_bytes(data)
    return d, ref


def test_fp8_per_tensor_and_per_channel_dequantize_to_bf16(tmp_path: Path) -> None:
    d, ref = _fp8_dir(tmp_path, {"quant_method": "fbgemm_fp8"})
    ck = import_model(str(d), tmp_path / "models", n_blocks=2)
    assert ck.manifest.dtype is DType.BFLOAT16
    ours: dict[str, torch.Tensor] = {}
    for b in range(2):
        ours.update(ck.block_tensors(b))
    for k, want in ref.items():
        assert ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], want), k
    entries = {e.name: e for blk in ck.manifest.blocks for e in blk.tensors}
    assert entries["model.layers.0.mlp.up_proj.weight"].source_dtype == "F8_E4M3"
    assert entries["model.layers.0.input_layernorm.weight"].source_dtype == "BF16"
    assert {e.dtype for e in entries.values()} == {DType.BFLOAT16}
    # each block's tensors tile its file: one contiguous range per block
    for blk in ck.manifest.blocks:
        assert blk.tensors[-1].end == blk.nbytes == (ck.dir / blk.file).stat().st_size


def test_fp8_block_wise_scales_are_refused_naming_the_field(tmp_path: Path) -> None:
    d, _ = _fp8_dir(tmp_path, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match=r"fp8/config\.json: field quantization_config\.weight_block_size"):
        import_model(str(d), tmp_path / "models")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"field quantization_config\.quant_method='gptq' is not supported"):
        import_model(str(d), tmp_path / "models")
