"""The stage-level API: run a contiguous block range on a batch of sequences, with its own KV cache.

This is the unit λPipe composes: stage i of an execution pipeline lives on the node that holds
block i, receives hidden states ``[N, hidden]`` from stage i-1 (or token ids, for block 0) and
hands its output to stage i+1 (or logits back, for the last block). Each stage keeps the KV
cache of its own layers per sequence, so a pipeline of stages produces the same tokens as one
full model (``tests/engine/test_stage_split.py`` checks it).

A full model is the stage that covers every block (see :func:`full_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import torch

from lambdascale.errors import InvalidRequestError
from lambdascale.engine.kv_cache import KVCache
from lambdascale.model.arch import ModelArch
from lambdascale.model.llama import AttentionMetadata, StageModel

SeqId = Hashable


@dataclass(frozen=True)
class SeqSlice:
    """New tokens of one sequence in a step: positions ``start .. start + length - 1``."""

    seq_id: SeqId
    start: int
    length: int


@dataclass(frozen=True)
class StageBatch:
    """One step's work for a stage. Rows of the flat input follow ``seqs`` in order.

    Sequences with one new token should come first: the stage attends leading single-token
    sequences as one batch (decode) and the rest one by one (prefill).
    """

    seqs: tuple[SeqSlice, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)


class Stage:
    """A :class:`StageModel` plus the KV cache of its layers, keyed by sequence id."""

    def __init__(self, model: StageModel, max_len: int, max_seqs: int) -> None:
        arch = model.arch
        self.model = model
        self.max_len = max_len
        self.kv = KVCache(
            n_layers=model.num_layers,
            n_kv_heads=arch.num_key_value_heads,
            head_dim=arch.dim_per_head,
            max_len=max_len,
            max_slots=max_seqs,
            dtype=model.dtype,
            device=model.device,
        )

    @property
    def first(self) -> bool:
        return self.model.first

    @property
    def last(self) -> bool:
        return self.model.last

    def cached_len(self, seq_id: SeqId) -> int:
        return self.kv.length(seq_id)

    def release(self, seq_id: SeqId) -> bool:
        """Free a sequence's KV slot (finished, aborted or moved away)."""
        return self.kv.free(seq_id)

    def export_kv(self, seq_id: SeqId) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This stage's K/V of one sequence, per layer [n_kv, length, head_dim] (to move it)."""
        return self.kv.export(seq_id)

    def import_kv(self, seq_id: SeqId, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Adopt a sequence's K/V exported by a stage over the same layers; it continues from there."""
        self.kv.load(seq_id, kv)

    def forward(self, batch: StageBatch, x: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the batch: token ids [N] (first stage) or hidden [N, hidden] in; hidden or logits out.

        A sequence new to this stage must start at position 0; a known one must continue
        exactly where its cache ends (a mismatch is a bug upstream and raises ``ValueError``).
        A sequence that would exceed ``max_len`` raises ``InvalidRequestError`` before any
        state changes.
        """
        longest = 0
        for s in batch.seqs:
            if s.length <= 0:
                raise ValueError(f"sequence {s.seq_id!r}: step of {s.length} tokens")
            have = self.kv.length(s.seq_id) if s.seq_id in self.kv else 0
            if s.start != have:
                raise ValueError(f"sequence {s.seq_id!r} starts at {s.start} but this stage caches {have} tokens")
            end = s.start + s.length
            if end > self.max_len:
                raise InvalidRequestError(
                    f"sequence {s.seq_id!r} would reach {end} tokens, over the context limit of {self.max_len}"
                )
            longest = max(longest, end)
        new = [s.seq_id for s in batch.seqs if s.seq_id not in self.kv]
        if len(new) + len(self.kv) > self.kv.max_slots:
            raise InvalidRequestError(
                f"stage can hold {self.kv.max_slots} sequences; {len(self.kv)} held and {len(new)} new"
            )
        for sid in new:
            self.kv.allocate(sid)
        try:
            self.kv.reserve_tokens(longest)
            meta = AttentionMetadata(
                slots=tuple(self.kv.slot(s.seq_id) for s in batch.seqs),
                starts=tuple(s.start for s in batch.seqs),
                lengths=tuple(s.length for s in batch.seqs),
            )
            out = self.model.forward(x, meta, self.kv.buffers(), all_logits=all_logits)
        except BaseException:
            for sid in new:  # a failed step must not leak the slots it handed out
                self.kv.free(sid)
            raise
        for s in batch.seqs:
            self.kv.set_length(s.seq_id, s.start + s.length)
        return out


def split_stages(
    arch: ModelArch,
    tensors: Mapping[str, torch.Tensor],
    block_ranges: Sequence[tuple[int, int]],
    max_len: int,
    max_seqs: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> list[Stage]:
    """Stages for contiguous layer ranges that tile the model, from one canonical state dict."""
    stages = []
    for rng in block_ranges:
        model = StageModel.from_tensors(arch, tensors, layers=rng, device=device, dtype=dtype)
        stages.append(Stage(model, max_len, max_seqs))
    return stages


def full_stage(
    arch: ModelArch,
    tensors: Mapping[str, torch.Tensor],
    max_len: int,
    max_seqs: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Stage:
    """The whole model as one stage."""
    return split_stages(arch, tensors, [(0, arch.num_hidden_layers)], max_len, max_seqs, device, dtype)[0]


def stage_from_checkpoint(
    ckpt: Any,
    blocks: range,
    max_len: int,
    max_seqs: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Stage:
    """A stage for execution blocks ``blocks`` of a checkpoint (``lambdascale.model.checkpoint``).

    Reads each block with ``ckpt.block_tensors(b, device, dtype)`` (every chunk checksummed by
    the checkpoint layer); the layer range comes from the block plan of the manifest.
    """
    if len(blocks) == 0:
        raise ValueError("a stage needs at least one block")
    arch: ModelArch = ckpt.arch
    n_blocks = ckpt.manifest.n_blocks
    if blocks.start < 0 or blocks.stop > n_blocks or blocks.step != 1:
        raise ValueError(f"blocks {blocks} are not a contiguous range of the model's {n_blocks} blocks")
    entries = ckpt.manifest.blocks
    tensors: dict[str, torch.Tensor] = {}
    for b in blocks:
        tensors.update(ckpt.block_tensors(b, device=device, dtype=dtype))
    layers = (int(entries[blocks.start].layers[0]), int(entries[blocks.stop - 1].layers[1]))
    model = StageModel.from_tensors(
        arch, tensors, layers=layers, first=blocks.start == 0, last=blocks.stop == n_blocks,
        device=device, dtype=dtype, source=str(getattr(ckpt, "dir", ckpt)),
    )
    return Stage(model, max_len, max_seqs)
