"""A compact PyTorch decoder for every supported family, built per execution block.

Why our own: execute-while-load needs any contiguous range of layers to run alone, on hidden
states handed over from another process, with the KV cache of only its own layers. So the unit
here is a :class:`StageModel`: layers ``[start, end)`` plus the embedding when it is the first
stage and the final norm + LM head when it is the last. A full model is simply the stage
covering every layer.

Covered (``lambdascale.model.families``): Llama 1/2/3 (RoPE default/linear/dynamic/llama3/yarn
scaling), SmolLM, Mistral and Phi-3/4 (sliding window, partial rotary), Qwen2/2.5 (q/k/v bias),
Qwen3 (q/k norms), Gemma 2/3 ((1 + w) norms around attention and MLP, GeGLU, scaled embeddings,
soft-capped scores and logits, sliding layers alternating with global ones, a RoPE base per
kind), Mixtral / Qwen2-MoE / Qwen3-MoE (top-k routed experts, a shared expert);
grouped-query attention; tied or untied embeddings. The layer reads only the feature fields of
:class:`ModelArch`, never the family. Numerics follow Hugging Face's reference (RMSNorm in
float32, rotate-half RoPE), so float32 logits agree to ~1e-6.

Layout of a step: the tokens of every sequence in the batch are flattened into one
``[N, hidden]`` matrix (N = sum of new tokens), so all projections are single matmuls; only
attention is per sequence: decode tokens (one new token each) are attended in one padded batch,
prefill segments one sequence at a time with a causal mask. With ``batch_invariant`` every
sequence (decodes too) is attended alone and projections pad small batches (see
:func:`invariant_linear`), so a row's result does not depend on its batch. The KV cache itself (allocation,
slots, growth) is owned by the engine (``lambdascale.engine.kv_cache``); this module only reads
and writes the per-layer buffers it is handed.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import LayerKind, ModelArch
from lambdascale.model.attention import AttentionMetadata, DecodeBatch, attention
from lambdascale.model.blockfile import block_tensor_shapes
from lambdascale.model.moe import DenseMLP, MoEMLP
from lambdascale.model.rope import RotaryEmbedding, apply_rope

__all__ = ["AttentionMetadata", "DecoderLayer", "KVBuffers", "StageModel", "expected_shapes", "invariant_linear",
           "rms_norm"]

#: Per-layer KV buffers: (k, v), each of shape [slot_capacity, n_kv_heads, token_capacity, head_dim].
KVBuffers = Sequence[tuple[torch.Tensor, torch.Tensor]]


def expected_shapes(arch: ModelArch, layers: tuple[int, int], first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a stage needs, with its shape: the block format's (one contract, in
    :func:`lambdascale.model.blockfile.block_tensor_shapes`)."""
    return block_tensor_shapes(arch, layers, first, last)


#: Below this many rows, CPU BLAS picks row-count-dependent kernels (measured on torch 2.13): a
#: batch-invariant linear pads its input with zero rows up to this count.
MIN_INVARIANT_ROWS = 4


def invariant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose row results do not depend on how many rows the batch has.

    x: [M, in], w: [out, in] -> [M, out]. With one BLAS thread, each row's result is bitwise the
    same for every M >= ``MIN_INVARIANT_ROWS``; smaller M are padded with zero rows (dropped after).
    """
    m = x.shape[0]
    if m >= MIN_INVARIANT_ROWS:
        return F.linear(x, w, b)
    pad = x.new_zeros(MIN_INVARIANT_ROWS - m, x.shape[1])
    return F.linear(torch.cat([x, pad]), w, b)[:m]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32.

    Llama's casts back before the weight (``w * x.to(dtype)``); Gemma's (``unit_offset``) scales
    by ``1 + w`` in float32 and casts after, as each reference does.
    """
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.to(torch.float32))).to(dtype)
    return weight * xf.to(dtype)


class DecoderLayer:
    """One decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); with ``sandwich_norms`` the
    attention and MLP outputs are normed too before they join the residual (Gemma 2/3)."""

    def __init__(
        self, arch: ModelArch, t: Mapping[str, torch.Tensor], index: int, batch_invariant: bool = False
    ) -> None:
        p = f"model.layers.{index}."
        self.index = index
        self.set_batch_invariant(batch_invariant)
        self.eps = arch.rms_norm_eps
        self.unit_offset = arch.norm_unit_offset
        self.n_heads = arch.num_attention_heads
        self.n_kv = arch.num_key_value_heads
        self.d = arch.dim_per_head
        self.kind = arch.layer_kind(index)
        self.window = arch.window_of(index)
        self.softcap = arch.attn_logit_softcapping
        self.ln1 = t[p + "input_layernorm.weight"]
        self.ln2 = t[p + "post_attention_layernorm.weight"]
        self.ln_pre_ff = t.get(p + "pre_feedforward_layernorm.weight")  # sandwich norms only
        self.ln_post_ff = t.get(p + "post_feedforward_layernorm.weight")
        self.wq = t[p + "self_attn.q_proj.weight"]  # [heads*d, hidden]
        self.wk = t[p + "self_attn.k_proj.weight"]  # [kv*d, hidden]
        self.wv = t[p + "self_attn.v_proj.weight"]  # [kv*d, hidden]
        self.wo = t[p + "self_attn.o_proj.weight"]  # [hidden, heads*d]
        self.bq = t.get(p + "self_attn.q_proj.bias")
        self.bk = t.get(p + "self_attn.k_proj.bias")
        self.bv = t.get(p + "self_attn.v_proj.bias")
        self.q_norm = t.get(p + "self_attn.q_norm.weight")  # [d], qk_norm only
        self.k_norm = t.get(p + "self_attn.k_norm.weight")
        self.mlp: DenseMLP | MoEMLP
        if arch.is_moe_layer(index):
            self.mlp = MoEMLP(arch, t, p)
        else:
            self.mlp = DenseMLP(t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"],
                                t[p + "mlp.down_proj.weight"], arch.hidden_act)
        self.scale = arch.attn_scale

    def set_batch_invariant(self, on: bool) -> None:
        """Switch padded projections and per-sequence attention on or off."""
        self.batch_invariant = on
        self.linear = invariant_linear if on else F.linear

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.eps, self.unit_offset)

    def __call__(
        self,
        x: torch.Tensor,
        rope: Mapping[LayerKind, tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
        decode: DecodeBatch | None,
    ) -> torch.Tensor:
        n = x.shape[0]
        h = self._norm(x, self.ln1)  # [N, hidden]
        lin = self.linear
        q = lin(h, self.wq, self.bq).view(n, self.n_heads, self.d)  # [N, H, d]
        k = lin(h, self.wk, self.bk).view(n, self.n_kv, self.d)  # [N, KV, d]
        v = lin(h, self.wv, self.bv).view(n, self.n_kv, self.d)  # [N, KV, d]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)  # per head, over d
        cos, sin = rope[self.kind]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        dec = None if self.batch_invariant else decode  # invariant: every sequence attends alone
        attn = attention(q, k, v, meta, kv, dec, scale=self.scale, window=self.window, softcap=self.softcap)
        o = lin(attn, self.wo)  # [N, hidden]
        if self.ln_pre_ff is not None and self.ln_post_ff is not None:
            x = x + self._norm(o, self.ln2)
            return x + self._norm(self.mlp(self._norm(x, self.ln_pre_ff), lin), self.ln_post_ff)
        x = x + o
        return x + self.mlp(self._norm(x, self.ln2), lin)


class StageModel:
    """Layers ``[start, end)`` of a model, plus embedding (first) and norm + LM head (last).

    Input: token ids int64 [N] when ``first``, else hidden states [N, hidden].
    Output: hidden states [N, hidden] when not ``last``; else float32 logits of shape
    [num_sequences, vocab] (each sequence's last new token) or [N, vocab] with ``all_logits``.
    """

    def __init__(
        self,
        arch: ModelArch,
        tensors: Mapping[str, torch.Tensor],
        layers: tuple[int, int],
        first: bool,
        last: bool,
        device: torch.device | str = "cpu",
        batch_invariant: bool = False,
    ) -> None:
        self.arch = arch
        self.batch_invariant = batch_invariant
        self.layers_range = layers
        self.first = first
        self.last = last
        self.device = torch.device(device)
        self.embed = tensors.get("model.embed_tokens.weight") if first else None
        self.layers = [DecoderLayer(arch, tensors, i, batch_invariant) for i in range(*layers)]
        self.norm = tensors.get("model.norm.weight") if last else None
        self.lm_head = tensors.get("lm_head.weight") if last else None
        if first and self.embed is None:
            raise CheckpointError("a first stage needs model.embed_tokens.weight")
        if last and (self.norm is None or self.lm_head is None):
            raise CheckpointError("a last stage needs model.norm.weight and lm_head.weight")
        any_t = next(iter(tensors.values()))
        self.dtype = any_t.dtype
        # one RoPE table per attention kind among this stage's layers (Gemma 3's sliding layers
        # have a base of their own; otherwise both kinds share the global table)
        kinds = {arch.layer_kind(i) for i in range(*layers)}
        self.ropes = {k: RotaryEmbedding(arch, self.device, local=k is LayerKind.SLIDING) for k in kinds}

    def set_batch_invariant(self, on: bool) -> None:
        """Make every row's output independent of the batch it runs in (see the module docstring)."""
        self.batch_invariant = on
        for layer in self.layers:
            layer.set_batch_invariant(on)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_tensors(
        cls,
        arch: ModelArch,
        tensors: Mapping[str, torch.Tensor],
        layers: tuple[int, int] | None = None,
        first: bool | None = None,
        last: bool | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        source: str = "state dict",
        batch_invariant: bool = False,
    ) -> "StageModel":
        """Build from canonical tensors, checking names and shapes against ``arch``.

        ``layers`` defaults to all layers; ``first``/``last`` default to whether the range
        touches the model's ends. Tied embeddings: a last stage without ``lm_head.weight``
        uses ``model.embed_tokens.weight`` when present. Extra tensors are ignored (a block
        file of a larger range can feed a smaller stage). Raises ``CheckpointError`` naming
        ``source`` and the tensor on a missing tensor or a shape mismatch.
        """
        if layers is None:
            layers = (0, arch.num_hidden_layers)
        start, end = layers
        if not (0 <= start < end <= arch.num_hidden_layers):
            raise CheckpointError(
                f"layer range [{start}, {end}) is outside the model's {arch.num_hidden_layers} layers"
            )
        first = start == 0 if first is None else first
        last = end == arch.num_hidden_layers if last is None else last
        t = dict(tensors)
        if last and "lm_head.weight" not in t and arch.tie_word_embeddings and "model.embed_tokens.weight" in t:
            t["lm_head.weight"] = t["model.embed_tokens.weight"]
        want = expected_shapes(arch, layers, first, last)
        picked: dict[str, torch.Tensor] = {}
        for name, shape in want.items():
            if name not in t:
                raise CheckpointError(f"{source}: missing tensor {name!r} needed for layers [{start}, {end})")
            got = tuple(t[name].shape)
            if got != shape:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")
            x = t[name]
            if dtype is not None and x.dtype != dtype:
                x = x.to(dtype)
            picked[name] = x.to(device)
        return cls(arch, picked, layers, first, last, device, batch_invariant)

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVBuffers,
        decode_rows: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run this stage on a flat batch; see the class docstring for shapes.

        ``kv[j]`` are the buffers of this stage's j-th layer. ``decode_rows``: how many leading
        sequences in ``meta`` are single-token steps attended as one batch (default: all leading
        sequences with one new token).
        """
        if decode_rows is None:
            decode_rows = 0
            while decode_rows < len(meta.lengths) and meta.lengths[decode_rows] == 1:
                decode_rows += 1
        if self.batch_invariant and self.device.type == "cpu" and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # multi-threaded BLAS splits rows by batch size
        if len(kv) != len(self.layers):
            raise ValueError(f"got KV buffers for {len(kv)} layers, stage has {len(self.layers)}")
        if self.first:
            if x.dtype != torch.int64 or x.dim() != 1:
                raise ValueError(f"first stage takes int64 token ids of shape [N], got {x.dtype} {tuple(x.shape)}")
            assert self.embed is not None  # set for every first stage by from_tensors
            h = F.embedding(x, self.embed)  # [N, hidden]
            if self.arch.scale_embeddings:  # Gemma: sqrt(hidden) rounded to the weights' dtype first
                h = h * torch.tensor(self.arch.hidden_size ** 0.5, dtype=h.dtype)
        else:
            h = x.to(self.dtype)
        if h.shape[0] != meta.num_tokens:
            raise ValueError(f"batch has {h.shape[0]} rows but metadata describes {meta.num_tokens} tokens")
        positions = meta.positions(self.device)
        seq_len = max(s + n for s, n in zip(meta.starts, meta.lengths))
        rope = {k: r.cos_sin(positions, h.dtype, seq_len) for k, r in self.ropes.items()}  # [N, rotary_dim] each
        dec = DecodeBatch.build(meta, decode_rows, self.device)
        for layer, buf in zip(self.layers, kv):
            h = layer(h, rope, meta, buf, dec)
        if not self.last:
            return h
        assert self.norm is not None and self.lm_head is not None  # set for every last stage
        if not all_logits:
            h = h[meta.last_token_rows()]  # [num_seqs, hidden]
        h = rms_norm(h, self.norm, self.arch.rms_norm_eps, self.arch.norm_unit_offset)
        lin = invariant_linear if self.batch_invariant else F.linear
        logits = lin(h, self.lm_head).to(torch.float32)  # [rows, vocab]
        cap = self.arch.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    __call__ = forward
