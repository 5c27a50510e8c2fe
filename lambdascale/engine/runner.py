"""The model runner: executes a :class:`SchedulerOutput` on a pipeline of stages.

Locally the "pipeline" is usually one stage covering the whole model; with several stages the
hidden states ``[N, hidden]`` flow from one to the next in-process (the distributed λPipe
runtime does the same over the network with the same :class:`Stage` API).
"""

from __future__ import annotations

from dataclasses import dataclass
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


class ModelRunner:
    """Runs scheduled steps through ``stages`` (first takes token ids, last returns logits)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a runner needs at least one stage")
        if not stages[0].first or not stages[-1].last:
            raise ValueError("stages must start with the embedding block and end with the LM-head block")
        self.stages = list(stages)
        self.device = stages[0].model.device

    def execute(self, sched: SchedulerOutput, token_ids: Mapping[str, Sequence[int]]) -> RunnerOutput:
        """``token_ids[rid]`` are the tokens of that sequence's scheduled range, in order."""
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
        for st in self.stages:
            x = st.forward(batch, x)
        rows = [i for i, s in enumerate(sched.seqs) if s.sample]
        return RunnerOutput(tuple(sched.seqs[i].request_id for i in rows), x[rows].float().cpu())

    def release(self, request_id: str) -> None:
        """Free the request's KV cache in every stage."""
        for st in self.stages:
            st.release(request_id)

    def cached_sequences(self) -> int:
        return len(self.stages[0].kv)
