"""KV cache of one stage: per-layer buffers with one slot per sequence.

Why slots in one tensor per layer (not one tensor per sequence): batched decode attends every
sequence of the batch to its own prefix in one call; with sequences in adjacent slots the keys
of the whole batch are a *view* ``k[lo:hi, :, :T]`` of the buffer, so no per-step copy. Slots
are handed out lowest-first so running sequences stay packed.

Both dimensions grow by doubling (slots up to the batch limit, tokens up to ``max_len``), so a
short-prompt workload does not pay for the model's full context up front. Growth copies the
old contents; it happens O(log) times per run.
"""

from __future__ import annotations

from typing import Hashable

import torch

from lambdascale.errors import InvalidRequestError

SeqId = Hashable


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class KVCache:
    """KV buffers for ``n_layers`` layers: k and v each [slot_cap, n_kv, token_cap, head_dim]."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial_slots: int = 1,
        initial_tokens: int = 128,
    ) -> None:
        if max_len <= 0 or max_slots <= 0:
            raise ValueError(f"max_len and max_slots must be positive, got {max_len}, {max_slots}")
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.max_slots = max_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self.slot_cap = min(max_slots, max(1, initial_slots))
        self.token_cap = min(max_len, max(1, initial_tokens))
        self._slot_of: dict[SeqId, int] = {}
        self._len: dict[SeqId, int] = {}
        self._free: list[int] = list(range(self.slot_cap))
        self._k = [self._alloc(self.slot_cap, self.token_cap) for _ in range(n_layers)]
        self._v = [self._alloc(self.slot_cap, self.token_cap) for _ in range(n_layers)]

    def _alloc(self, slots: int, tokens: int) -> torch.Tensor:
        return torch.zeros(slots, self.n_kv_heads, tokens, self.head_dim, dtype=self.dtype, device=self.device)

    # ---- bookkeeping ---------------------------------------------------------------------
    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot(self, seq_id: SeqId) -> int:
        return self._slot_of[seq_id]

    def length(self, seq_id: SeqId) -> int:
        """Tokens cached for ``seq_id`` (0 when unknown)."""
        return self._len.get(seq_id, 0)

    def set_length(self, seq_id: SeqId, n: int) -> None:
        self._len[seq_id] = n

    def allocate(self, seq_id: SeqId) -> int:
        """Give ``seq_id`` the lowest free slot, growing the slot dimension when full."""
        if seq_id in self._slot_of:
            raise ValueError(f"sequence {seq_id!r} already holds slot {self._slot_of[seq_id]}")
        if not self._free:
            if self.slot_cap >= self.max_slots:
                raise InvalidRequestError(
                    f"KV cache is full: {self.max_slots} sequences (engine.max_batch_size) already hold slots"
                )
            self._grow(min(self.max_slots, self.slot_cap * 2), self.token_cap)
        slot = min(self._free)
        self._free.remove(slot)
        self._slot_of[seq_id] = slot
        self._len[seq_id] = 0
        return slot

    def free(self, seq_id: SeqId) -> bool:
        """Release ``seq_id``'s slot; returns False when it held none."""
        slot = self._slot_of.pop(seq_id, None)
        self._len.pop(seq_id, None)
        if slot is None:
            return False
        self._free.append(slot)
        return True

    def reserve_tokens(self, n: int) -> None:
        """Make room for sequences of up to ``n`` tokens (``InvalidRequestError`` past max_len)."""
        if n > self.max_len:
            raise InvalidRequestError(f"sequence of {n} tokens exceeds the context limit of {self.max_len} tokens")
        if n > self.token_cap:
            self._grow(self.slot_cap, min(self.max_len, _next_pow2(n)))

    def _grow(self, slots: int, tokens: int) -> None:
        for bufs in (self._k, self._v):
            for i, old in enumerate(bufs):
                new = self._alloc(slots, tokens)
                new[: old.shape[0], :, : old.shape[2]] = old
                bufs[i] = new
        self._free.extend(range(self.slot_cap, slots))
        self.slot_cap, self.token_cap = slots, tokens

    def export(self, seq_id: SeqId) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one sequence's cached K/V per layer, each [n_kv, length, head_dim]."""
        slot, n = self._slot_of[seq_id], self._len[seq_id]
        return [(k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in zip(self._k, self._v)]

    def load(self, seq_id: SeqId, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install K/V exported elsewhere (same layers) for a sequence new to this cache."""
        if len(kv) != self.n_layers:
            raise ValueError(f"got K/V for {len(kv)} layers, this cache holds {self.n_layers}")
        n = kv[0][0].shape[1]
        want = (self.n_kv_heads, n, self.head_dim)
        for i, (k, v) in enumerate(kv):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"layer {i}: K/V shapes {tuple(k.shape)}/{tuple(v.shape)}, expected {want}")
        self.reserve_tokens(n)
        slot = self.allocate(seq_id)
        for (kb, vb), (k, v) in zip(zip(self._k, self._v), kv):
            kb[slot, :, :n] = k.to(kb.dtype)
            vb[slot, :, :n] = v.to(vb.dtype)
        self._len[seq_id] = n

    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) buffers, to hand to ``StageModel.forward``."""
        return list(zip(self._k, self._v))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)
