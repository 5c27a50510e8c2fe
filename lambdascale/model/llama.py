"""A compact PyTorch Llama-family decoder, built per execution block.

Why our own: execute-while-load needs any contiguous range of layers to run alone, on hidden
states handed over from another process, with the KV cache of only its own layers. So the unit
here is a :class:`StageModel`: layers ``[start, end)`` plus the embedding when it is the first
stage and the final norm + LM head when it is the last. A full model is simply the stage
covering every layer.

Covered: Llama 1/2/3 (RoPE default/linear/dynamic/llama3/yarn scaling), SmolLM (a Llama),
Mistral (no sliding window: contexts here stay within it), Qwen2 (q/k/v bias); grouped-query
attention; SwiGLU MLP; tied or untied embeddings. Numerics follow Hugging Face's reference
(RMSNorm in float32, rotate-half RoPE), so float32 logits agree to ~1e-6.

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

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch
from lambdascale.model.rope import RotaryEmbedding, apply_rope

#: Per-layer KV buffers: (k, v), each of shape [slot_capacity, n_kv_heads, token_capacity, head_dim].
KVBuffers = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and in the KV cache.

    Sequence i owns rows ``[offsets[i], offsets[i] + lengths[i])`` of the flat ``[N, hidden]``
    input, its cache slot is ``slots[i]`` and its new tokens take positions
    ``starts[i] .. starts[i] + lengths[i] - 1`` (``starts[i]`` = tokens already cached).
    """

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.lengths:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 positions of every new token, shape [N]."""
        return torch.cat(
            [torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(self.starts, self.lengths)]
        ).to(device)

    def last_token_rows(self) -> list[int]:
        """Row of each sequence's last new token in the flat batch (where its logits come from)."""
        return [o + n - 1 for o, n in zip(self.offsets, self.lengths)]


@dataclass(frozen=True)
class _DecodeBatch:
    """Per-step index tensors for the batched single-token rows, built once for all layers."""

    rows: int  # the first ``rows`` sequences have one new token each
    slot_t: torch.Tensor  # [B] int64 cache slots
    pos_t: torch.Tensor  # [B] int64 position of each new token
    mask: torch.Tensor  # [B, 1, 1, T] bool: key j visible to row b (j <= pos_b)
    t_max: int  # keys to read: max(pos) + 1
    slot_range: tuple[int, int] | None  # (lo, hi) when the slots are exactly lo..hi-1 in order

    @classmethod
    def build(cls, meta: AttentionMetadata, rows: int, device: torch.device) -> "_DecodeBatch | None":
        if rows == 0:
            return None
        slots, starts = meta.slots[:rows], meta.starts[:rows]
        slot_t = torch.tensor(slots, dtype=torch.int64, device=device)
        pos_t = torch.tensor(starts, dtype=torch.int64, device=device)
        t_max = max(starts) + 1
        mask = (torch.arange(t_max, device=device)[None, :] <= pos_t[:, None])[:, None, None, :]
        lo = min(slots)
        contiguous = list(slots) == list(range(lo, lo + rows))
        return cls(rows, slot_t, pos_t, mask, t_max, (lo, lo + rows) if contiguous else None)


def layer_tensor_names(arch: ModelArch, i: int) -> list[str]:
    """Canonical (Hugging Face) names of decoder layer ``i``'s tensors."""
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v", "o")]
    if arch.attention_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in ("q", "k", "v")]
    names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def expected_shapes(arch: ModelArch, layers: tuple[int, int], first: bool, last: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a stage needs, with its shape (the contract with the checkpoint format)."""
    h, d, inter = arch.hidden_size, arch.dim_per_head, arch.intermediate_size
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {}
    if first:
        out["model.embed_tokens.weight"] = (arch.vocab_size, h)
    for i in range(*layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if arch.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    if last:
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (arch.vocab_size, h)
    return out


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as the reference does."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class DecoderLayer:
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, arch: ModelArch, t: Mapping[str, torch.Tensor], index: int, batch_invariant: bool = False
    ) -> None:
        p = f"model.layers.{index}."
        self.index = index
        self.set_batch_invariant(batch_invariant)
        self.eps = arch.rms_norm_eps
        self.n_heads = arch.num_attention_heads
        self.n_kv = arch.num_key_value_heads
        self.d = arch.dim_per_head
        self.ln1 = t[p + "input_layernorm.weight"]
        self.ln2 = t[p + "post_attention_layernorm.weight"]
        self.wq = t[p + "self_attn.q_proj.weight"]  # [heads*d, hidden]
        self.wk = t[p + "self_attn.k_proj.weight"]  # [kv*d, hidden]
        self.wv = t[p + "self_attn.v_proj.weight"]  # [kv*d, hidden]
        self.wo = t[p + "self_attn.o_proj.weight"]  # [hidden, heads*d]
        self.bq = t.get(p + "self_attn.q_proj.bias")
        self.bk = t.get(p + "self_attn.k_proj.bias")
        self.bv = t.get(p + "self_attn.v_proj.bias")
        self.w_gate = t[p + "mlp.gate_proj.weight"]  # [inter, hidden]
        self.w_up = t[p + "mlp.up_proj.weight"]  # [inter, hidden]
        self.w_down = t[p + "mlp.down_proj.weight"]  # [hidden, inter]
        self.scale = self.d ** -0.5

    def set_batch_invariant(self, on: bool) -> None:
        """Switch padded projections and per-sequence attention on or off."""
        self.batch_invariant = on
        self.linear = invariant_linear if on else F.linear

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
        decode: "_DecodeBatch | None",
    ) -> torch.Tensor:
        n = x.shape[0]
        h = rms_norm(x, self.ln1, self.eps)  # [N, hidden]
        lin = self.linear
        q = lin(h, self.wq, self.bq).view(n, self.n_heads, self.d)  # [N, H, d]
        k = lin(h, self.wk, self.bk).view(n, self.n_kv, self.d)  # [N, KV, d]
        v = lin(h, self.wv, self.bv).view(n, self.n_kv, self.d)  # [N, KV, d]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        attn = self._attention(q, k, v, meta, kv, decode)  # [N, H*d]
        x = x + lin(attn, self.wo)
        h = rms_norm(x, self.ln2, self.eps)
        return x + lin(F.silu(lin(h, self.w_gate)) * lin(h, self.w_up), self.w_down)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
        decode: "_DecodeBatch | None",
    ) -> torch.Tensor:
        """Write new k/v into the cache, attend every query to its sequence's cached prefix.

        The first ``decode.rows`` sequences have exactly one new token each and are batched;
        the rest (prefill segments) run one by one with a causal mask offset by their start.
        """
        kc, vc = kv  # [slots, KV, T_cap, d]
        out = torch.empty(q.shape[0], self.n_heads, self.d, dtype=q.dtype, device=q.device)
        dec = None if self.batch_invariant else decode  # invariant: every sequence attends alone
        decode_rows = dec.rows if dec is not None else 0
        if dec is not None:
            kc[dec.slot_t, :, dec.pos_t] = k[:decode_rows]  # [B, KV, d] scattered at (slot, :, pos)
            vc[dec.slot_t, :, dec.pos_t] = v[:decode_rows]
            if dec.slot_range is not None:
                lo, hi = dec.slot_range
                keys, vals = kc[lo:hi, :, :dec.t_max], vc[lo:hi, :, :dec.t_max]  # views, no copy
            else:
                keys, vals = kc[dec.slot_t, :, :dec.t_max], vc[dec.slot_t, :, :dec.t_max]  # [B, KV, T, d]
            qd = q[:decode_rows].unsqueeze(2)  # [B, H, 1, d]
            o = F.scaled_dot_product_attention(
                qd, keys, vals, attn_mask=dec.mask, scale=self.scale, enable_gqa=self.n_heads != self.n_kv,
            )  # [B, H, 1, d]
            out[:decode_rows] = o.squeeze(2)
        offsets = meta.offsets
        for i in range(decode_rows, len(meta.slots)):
            slot, start, length, off = meta.slots[i], meta.starts[i], meta.lengths[i], offsets[i]
            end = start + length
            kc[slot, :, start:end] = k[off:off + length].transpose(0, 1)  # [KV, L, d]
            vc[slot, :, start:end] = v[off:off + length].transpose(0, 1)
            keys = kc[slot, :, :end].unsqueeze(0)  # [1, KV, end, d]
            vals = vc[slot, :, :end].unsqueeze(0)
            qs = q[off:off + length].transpose(0, 1).unsqueeze(0)  # [1, H, L, d]
            if start == 0:
                o = F.scaled_dot_product_attention(
                    qs, keys, vals, is_causal=True, scale=self.scale, enable_gqa=self.n_heads != self.n_kv
                )
            else:
                # query i (position start+i) sees keys 0..start+i
                mask = torch.arange(end, device=q.device)[None, :] <= (
                    torch.arange(length, device=q.device)[:, None] + start
                )  # [L, end]
                o = F.scaled_dot_product_attention(
                    qs, keys, vals, attn_mask=mask, scale=self.scale, enable_gqa=self.n_heads != self.n_kv
                )
            out[off:off + length] = o[0].transpose(0, 1)  # [L, H, d]
        return out.reshape(q.shape[0], self.n_heads * self.d)


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
        self.rope = RotaryEmbedding(arch, self.device)

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
        else:
            h = x.to(self.dtype)
        if h.shape[0] != meta.num_tokens:
            raise ValueError(f"batch has {h.shape[0]} rows but metadata describes {meta.num_tokens} tokens")
        positions = meta.positions(self.device)
        seq_len = max(s + n for s, n in zip(meta.starts, meta.lengths))
        cos, sin = self.rope.cos_sin(positions, h.dtype, seq_len)  # [N, d] each
        dec = _DecodeBatch.build(meta, decode_rows, self.device)
        for layer, buf in zip(self.layers, kv):
            h = layer(h, cos, sin, meta, buf, dec)
        if not self.last:
            return h
        assert self.norm is not None and self.lm_head is not None  # set for every last stage
        if not all_logits:
            h = h[meta.last_token_rows()]  # [num_seqs, hidden]
        h = rms_norm(h, self.norm, self.arch.rms_norm_eps)
        lin = invariant_linear if self.batch_invariant else F.linear
        return lin(h, self.lm_head).to(torch.float32)  # [rows, vocab]

    __call__ = forward
