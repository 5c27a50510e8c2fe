"""Import a Llama-architecture GGUF file (the demo model, SmolLM2-135M-Instruct Q4_1, or any
``*.gguf`` path).

Quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) are dequantized
to float32 with the ``gguf`` package's own dequantizer, one tensor at a time (torch versions of
the same arithmetic were written, matched it bit for bit and ran at half its speed on this
machine, so they were dropped); any other type is refused, before anything is written, naming the
tensor and the type. llama.cpp's converter
permutes the rows of Q and K so that its RoPE (interleaved pairs) matches HF's rotate-half
convention; we undo that permutation so our weights are in HF layout, as the contract requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import Family, ModelArch
from lambdascale.model.blockfile import block_tensor_shapes
from lambdascale.model.checkpoint import BlockSource
from lambdascale.model.generation import GenerationDefaults, from_gguf_fields
from lambdascale.model.importers.tokenizer import byte_level_bpe_files

#: GGUF tensor types we read: plain floats and the block quantizations of llama.cpp's legacy and
#: K-quant families (the i-quants, ternary and FP4 types are not read).
READ_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a GGUF tensor name (None for tensors we do not use)."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MAP:
        return f"model.layers.{int(parts[1])}.{_LAYER_MAP[parts[2]]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. ``w``: [n_head * head_dim, hidden] -> same shape.

    llama.cpp stores rows of each head as interleaved (pair, half) order:
    ``w.reshape(n_head, 2, hd/2, hidden).swapaxes(1, 2)``; this is its inverse.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk_t(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """:func:`unpermute_qk` on a torch tensor (a view; the caller makes it contiguous)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFSource:
    """Reads one GGUF file: arch, tokenizer files and a per-block tensor source."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read GGUF file: {e}") from None
        arch_name = _field(self.reader, "general.architecture")
        if arch_name != "llama":
            raise CheckpointError(f"{path}: unsupported GGUF architecture {arch_name!r}; supported: ['llama']")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.check_types()
        self.arch = self._arch()

    def _arch(self) -> ModelArch:
        r = self.reader
        p = "llama."
        hidden = int(_field(r, p + "embedding_length"))
        heads = int(_field(r, p + "attention.head_count"))
        rope_dim = _field(r, p + "rope.dimension_count")
        head_dim = int(rope_dim) if rope_dim is not None and int(rope_dim) != hidden // heads else None
        vocab = _field(r, p + "vocab_size") or len(_field(r, "tokenizer.ggml.tokens"))
        scaling_type = _field(r, p + "rope.scaling.type")
        rope_scaling = None
        if scaling_type not in (None, "none"):
            rope_scaling = {"rope_type": scaling_type, "factor": float(_field(r, p + "rope.scaling.factor", 1.0))}
        try:
            return ModelArch(
                family=Family.LLAMA,
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(_field(r, p + "feed_forward_length")),
                num_hidden_layers=int(_field(r, p + "block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(_field(r, p + "attention.head_count_kv", heads)),
                head_dim=head_dim,
                max_position_embeddings=int(_field(r, p + "context_length", 4096)),
                rms_norm_eps=float(_field(r, p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(_field(r, p + "rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling,
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
                eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: GGUF metadata does not describe a supported llama model: {e}") from None

    def check_types(self) -> None:
        """Refuse a file holding a tensor of a type we do not read, before anything is written."""
        for t in self.tensors.values():
            name = t.tensor_type.name
            if name not in READ_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has GGUF quant type {name}, which lambdascale does not read "
                    f"(reads: {', '.join(READ_TYPES)})"
                )
    def generation_defaults(self) -> GenerationDefaults:
        """The file's own sampling metadata and end-of-turn ids (``model/generation.py``)."""
        return from_gguf_fields(lambda k: _field(self.reader, k), str(self.path))

    def tensor(self, gguf_name: str) -> torch.Tensor:
        """One tensor dequantized to float32, in HF shape and (for Q/K) HF row order."""
        from gguf.quants import dequantize as gguf_dequantize

        t = self.tensors.get(gguf_name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {gguf_name} is missing")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        qtype = t.tensor_type.name
        if qtype in ("F32", "F16"):
            out = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(shape).copy())
        elif qtype == "BF16":
            raw = torch.from_numpy(np.asarray(t.data).reshape(-1).view(np.uint8).copy())
            out = raw.view(torch.bfloat16).to(torch.float32).reshape(shape)
        elif qtype in READ_TYPES:
            out = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        else:
            raise CheckpointError(f"{self.path}: tensor {gguf_name} has GGUF quant type {qtype}, which lambdascale "
                                  f"does not read (reads: {', '.join(READ_TYPES)})")
        if ".attn_q." in gguf_name:
            out = unpermute_qk_t(out, self.arch.num_attention_heads)
        elif ".attn_k." in gguf_name:
            out = unpermute_qk_t(out, self.arch.num_key_value_heads)
        return out.contiguous()

    def tensor_source_dtype(self, name: str) -> str | None:
        """The GGUF type a canonical tensor was dequantized from (Q4_K, F32, ...)."""
        if name == "lm_head.weight" and self.arch.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        reverse = {hf_name(n): n for n in self.tensors if hf_name(n) is not None}
        g = reverse.get(name)
        return self.tensors[g].tensor_type.name if g is not None else None

    def block_source(self, n_blocks: int) -> BlockSource:
        reverse = {hf_name(n): n for n in self.tensors if hf_name(n) is not None}

        def source(b: int, layers: tuple[int, int]) -> Mapping[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for name in block_tensor_shapes(self.arch, layers, b == 0, b == n_blocks - 1):
                if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                    out[name] = self.tensor("token_embd.weight")
                elif name not in reverse:
                    raise CheckpointError(f"{self.path}: no GGUF tensor provides {name}")
                else:
                    out[name] = self.tensor(reverse[name])
            return out

        return source

    def tokenizer_files(self) -> dict[str, bytes]:
        r = self.reader
        model = _field(r, "tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: unsupported GGUF tokenizer {model!r}; supported: ['gpt2'] (byte-level BPE)")
        tokens = _field(r, "tokenizer.ggml.tokens")
        merges = _field(r, "tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise CheckpointError(f"{self.path}: missing tokenizer: GGUF has no tokenizer.ggml.tokens/merges")
        return byte_level_bpe_files(
            tokens=tokens,
            merges=merges,
            token_types=_field(r, "tokenizer.ggml.token_type"),
            bos_id=_field(r, "tokenizer.ggml.bos_token_id"),
            eos_id=_field(r, "tokenizer.ggml.eos_token_id"),
            unk_id=_field(r, "tokenizer.ggml.unknown_token_id"),
            pad_id=_field(r, "tokenizer.ggml.padding_token_id"),
            chat_template=_field(r, "tokenizer.chat_template"),
            split_digits=_field(r, "tokenizer.ggml.pre") == "smollm",
            model_max_length=self.arch.max_position_embeddings,
        )
