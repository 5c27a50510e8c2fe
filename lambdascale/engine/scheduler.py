"""The scheduler: which sequences compute how many tokens in the next step.

A pure function of the running and waiting sequences (as :class:`SeqView`) and the limits, so it
is tested without a model. Policy (continuous batching, prefill and decode in one step):

1. every running sequence is scheduled: decodes (one token left to compute) first, one token
   each; running sequences still in a chunked prefill get the remaining token budget in order;
2. waiting sequences are admitted first-come first-served while the batch has room
   (``max_batch_size``) and the step's token budget (``max_num_batched_tokens``) is not spent;
   a prompt longer than the budget left is split into chunks over several steps.

With ``chunk_size`` (the engine's batch-invariant mode) a prefill chunk is always
``min(remaining, chunk_size)`` tokens, so chunk boundaries depend only on the request itself; a
chunk that does not fit the budget left waits for a later step instead of shrinking. A sequence
that knows its prompt length (``SeqView.prompt_len``, a request resumed with outputs already
generated) is *replayed* in that mode: its prompt in those chunks, then its known outputs one
single-token step each (not sampled), exactly the steps an uninterrupted run took, so its KV cache
and its next logits are bitwise the uninterrupted run's.

A sequence samples a token in a step only when that step computes its last pending token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SeqView:
    """What the scheduler needs to know of a sequence."""

    request_id: str
    num_computed: int  # tokens already in the KV cache
    num_tokens: int  # prompt + output tokens; the step that computes the last one samples
    #: prompt tokens; with ``chunk_size``, tokens past the prompt are computed one per step (replay)
    prompt_len: int | None = None

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed


def prefill_chunk_size(max_step_tokens: int, max_seqs: int) -> int:
    """Batch-invariant prefill chunk: fits a step's token budget next to a full set of decodes.

    One rule for every place a request can run (an in-process engine, a pipeline of agents), so a
    request is cut into the same chunks wherever it runs.
    """
    return max(1, max_step_tokens - max_seqs)


def next_step_tokens(computed: int, total: int, prompt_len: int, chunk_size: int) -> int:
    """Tokens a sequence computes in its next step in batch-invariant mode (depends on it alone).

    Inside the prompt: a chunk of ``min(rest of the prompt, chunk_size)``; past it: one token (a
    decode, or the replay of an output token already known). ``total`` = prompt + outputs.
    """
    if computed < prompt_len:
        return min(prompt_len - computed, chunk_size)
    return 1 if computed < total else 0


@dataclass(frozen=True)
class ScheduledSeq:
    """Compute tokens ``[start, start + length)`` of a sequence; ``sample`` = emit a token after."""

    request_id: str
    start: int
    length: int
    sample: bool


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. ``seqs`` lists decodes first (the model batches them)."""

    seqs: tuple[ScheduledSeq, ...]
    admitted: tuple[str, ...]  # waiting request ids that become running this step

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


def schedule(
    running: Sequence[SeqView],
    waiting: Sequence[SeqView],
    max_batch_size: int,
    max_num_batched_tokens: int,
    chunk_size: int | None = None,
) -> SchedulerOutput:
    """Plan the next step (see the module docstring for the policy)."""
    if max_batch_size < 1 or max_num_batched_tokens < 1:
        raise ValueError(f"limits must be positive: max_batch_size={max_batch_size}, "
                         f"max_num_batched_tokens={max_num_batched_tokens}")
    if chunk_size is not None and not 1 <= chunk_size <= max_num_batched_tokens:
        raise ValueError(f"chunk_size={chunk_size} must be in [1, max_num_batched_tokens={max_num_batched_tokens}]")

    def take(s: SeqView) -> int:
        if chunk_size is None:
            return min(s.remaining, budget)
        if s.prompt_len is None:
            n = min(s.remaining, chunk_size)
        else:
            n = next_step_tokens(s.num_computed, s.num_tokens, s.prompt_len, chunk_size)
        return n if n <= budget else 0

    decodes = [s for s in running if s.remaining == 1]
    prefilling = [s for s in running if s.remaining > 1]
    out: list[ScheduledSeq] = [ScheduledSeq(s.request_id, s.num_computed, 1, True) for s in decodes]
    budget = max_num_batched_tokens - len(decodes)
    for s in prefilling:
        if budget <= 0:
            break
        n = take(s)
        if n == 0:
            break
        out.append(ScheduledSeq(s.request_id, s.num_computed, n, n == s.remaining))
        budget -= n
    admitted: list[str] = []
    slots = max_batch_size - len(running)
    for s in waiting:
        if budget <= 0 or slots <= 0:
            break
        n = take(s)
        if n == 0:
            break
        out.append(ScheduledSeq(s.request_id, s.num_computed, n, n == s.remaining))
        admitted.append(s.request_id)
        budget -= n
        slots -= 1
    # single-token steps first so the model can batch their attention
    out.sort(key=lambda x: x.length != 1)
    return SchedulerOutput(tuple(out), tuple(admitted))
