"""Attention of one layer over the stage's KV cache: causal, optionally windowed, optionally
soft-capped.

Why here, apart from the layer: the KV cache layout (``[slots, KV, T_cap, d]`` per layer, owned
by ``lambdascale.engine.kv_cache``) and the two ways a step attends — leading single-token rows as
one padded batch (decode), the rest one sequence at a time (prefill) — are the same for every
family; what differs is only which keys a query may see and how scores are shaped:

* a sliding-window layer (Mistral, Gemma 2/3's local layers, Phi-3) lets the query at position
  ``p`` see keys ``p - window + 1 .. p`` (transformers' ``kv_idx > q_idx - sliding_window``). For
  now this is a mask over the full cache (correctness first; the cache still keeps every token);
* Gemma 2 soft-caps scores (``c * tanh(s / c)``) before the mask, which scaled-dot-product
  attention cannot do, so those layers run an explicit softmax in float32, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
import torch.nn.functional as F


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
class DecodeBatch:
    """Per-step index tensors for the batched single-token rows, built once for all layers."""

    rows: int  # the first ``rows`` sequences have one new token each
    slot_t: torch.Tensor  # [B] int64 cache slots
    pos_t: torch.Tensor  # [B] int64 position of each new token
    mask: torch.Tensor  # [B, 1, 1, T] bool: key j visible to row b (j <= pos_b)
    t_max: int  # keys to read: max(pos) + 1
    slot_range: tuple[int, int] | None  # (lo, hi) when the slots are exactly lo..hi-1 in order
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, meta: AttentionMetadata, rows: int, device: torch.device) -> "DecodeBatch | None":
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

    def mask_for(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, T] bool: keys row b sees under ``window`` (None: all earlier keys); built
        once per step per window size, shared by the layers that use it."""
        if window is None:
            return self.mask
        m = self._windowed.get(window)
        if m is None:
            keys = torch.arange(self.t_max, device=self.pos_t.device)[None, :]
            m = self.mask & (keys > self.pos_t[:, None] - window)[:, None, None, :]
            self._windowed[window] = m
        return m


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            softcap: float | None, causal: bool = False) -> torch.Tensor:
    """q [B, H, L, d], k/v [B, KV, T, d], mask bool broadcastable to [B, H, L, T] -> [B, H, L, d]."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        if causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, L, T]
    s = torch.tanh(s / softcap) * softcap
    if causal:
        mask = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv: tuple[torch.Tensor, torch.Tensor],
    decode: DecodeBatch | None,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write new k/v into the cache, attend every query to its sequence's cached prefix.

    q [N, H, d], k/v [N, KV, d] -> [N, H * d]. The first ``decode.rows`` sequences have exactly
    one new token each and are batched (``decode`` None: every sequence attends alone); the rest
    (prefill segments) run one by one with a causal mask offset by their start.
    """
    n_heads, d = q.shape[1], q.shape[2]
    kc, vc = kv  # [slots, KV, T_cap, d]
    out = torch.empty(q.shape[0], n_heads, d, dtype=q.dtype, device=q.device)
    decode_rows = decode.rows if decode is not None else 0
    if decode is not None:
        kc[decode.slot_t, :, decode.pos_t] = k[:decode_rows]  # [B, KV, d] scattered at (slot, :, pos)
        vc[decode.slot_t, :, decode.pos_t] = v[:decode_rows]
        if decode.slot_range is not None:
            lo, hi = decode.slot_range
            keys, vals = kc[lo:hi, :, :decode.t_max], vc[lo:hi, :, :decode.t_max]  # views, no copy
        else:
            keys, vals = kc[decode.slot_t, :, :decode.t_max], vc[decode.slot_t, :, :decode.t_max]  # [B, KV, T, d]
        qd = q[:decode_rows].unsqueeze(2)  # [B, H, 1, d]
        o = _attend(qd, keys, vals, decode.mask_for(window), scale, softcap)  # [B, H, 1, d]
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
        if start == 0 and window is None:
            o = _attend(qs, keys, vals, None, scale, softcap, causal=True)
        else:
            # query i (position start+i) sees keys 0..start+i, the last `window` of them when windowed
            qpos = torch.arange(length, device=q.device)[:, None] + start  # [L, 1]
            kpos = torch.arange(end, device=q.device)[None, :]  # [1, end]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            o = _attend(qs, keys, vals, mask, scale, softcap)  # [L, end] mask
        out[off:off + length] = o[0].transpose(0, 1)  # [L, H, d]
    return out.reshape(q.shape[0], n_heads * d)
