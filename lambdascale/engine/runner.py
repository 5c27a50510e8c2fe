"""The model runner: executes a :class:`SchedulerOutput` on a pipeline of stages.

Locally the "pipeline" is usually one stage covering the whole model; with several stages the
hidden states ``[N, hidden]`` flow from one to the next in-process (the distributed λPipe
runtime does the same over the network with the same :class:`Stage` API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from lambdascale.engine.scheduler import SchedulerOutput
from lambdascale.engine.stage import SeqSlice, Stage, StageBatch


@dataclass(frozen=True)
class RunnerOutput:
    """Logits of the sequences that sample this step: ``logits[i]`` belongs to ``request_ids[i]``.

    ``logits``: float32 [len(request_ids), vocab].
    """

    request_ids: tuple[str, ...]
    logits: torch.Tensor
    #: every row's logits [length, vocab] of the sequences asked for in ``execute(full=...)``
    full_logits: Mapping[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """Runs scheduled steps through ``stages`` (first takes token ids, last returns logits)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a runner needs at least one stage")
        if not stages[0].first or not stages[-1].last:
            raise ValueError("stages must start with the embedding block and end with the LM-head block")
        self.stages = list(stages)
        self.device = stages[0].model.device

    def execute(self, sched: SchedulerOutput, token_ids: Mapping[str, Sequence[int]],
                full: frozenset[str] = frozenset()) -> RunnerOutput:
        """``token_ids[rid]`` are the tokens of that sequence's scheduled range, in order; the
        sequences in ``full`` also get every row's logits (prompt logprobs)."""
        if sched.is_empty:
            return RunnerOutput((), torch.empty(0, 0))
        batch = StageBatch(tuple(SeqSlice(s.request_id, s.start, s.length) for s in sched.seqs))
        flat: list[int] = []
        for s in sched.seqs:
            ids = token_ids[s.request_id]
            if len(ids) != s.length:
                raise ValueError(f"request {s.request_id}: {len(ids)} token ids for a step of {s.length}")
            flat.extend(ids)
        x = torch.tensor(flat, dtype=torch.int64, device=self.device)
        want_full = bool(full & {s.request_id for s in sched.seqs})
        for st in self.stages:
            x = st.forward(batch, x, all_logits=want_full and st.last)
        if not want_full:
            rows = [i for i, s in enumerate(sched.seqs) if s.sample]
            return RunnerOutput(tuple(sched.seqs[i].request_id for i in rows), x[rows].float().cpu())
        ends, pos = [], 0  # x: [N, vocab]; each sequence's last row is its sampling row
        per: dict[str, torch.Tensor] = {}
        for s in sched.seqs:
            if s.request_id in full:
                per[s.request_id] = x[pos:pos + s.length].float().cpu()
            pos += s.length
            ends.append(pos - 1)
        rows = [i for i, s in enumerate(sched.seqs) if s.sample]
        return RunnerOutput(tuple(sched.seqs[i].request_id for i in rows), x[[ends[i] for i in rows]].float().cpu(), per)

    def release(self, request_id: str) -> None:
        """Free the request's KV cache in every stage."""
        for st in self.stages:
            st.release(request_id)

    def cached_sequences(self) -> int:
        return len(self.stages[0].kv)
