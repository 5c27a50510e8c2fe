"""``Engine.resume`` in batch-invariant mode replays a moved request: the continuation is bitwise
an uninterrupted run's (its logits too), also with other requests in the batch."""

from __future__ import annotations

import random

import pytest
import torch

from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.scheduler import SeqView, next_step_tokens, schedule
from lambdascale.engine.sequence import TokenState
from lambdascale.engine.settings import EngineSettings
from tests.engine.test_batch_invariance import ARCH, TENSORS, _requests, logged_run

# budget 16 with 8 sequences: prefill chunks of 8 tokens
SETTINGS = EngineSettings(device="cpu", dtype="bfloat16", batch_invariant=True, max_num_batched_tokens=16,
                          max_batch_size=8)


def _logits(states: dict[str, TokenState], settings: EngineSettings = SETTINGS) -> dict[str, list[torch.Tensor]]:
    """Run ``states`` together; every logits row each request sampled from, in order."""
    return logged_run(Engine.from_tensors(ARCH, TENSORS, None, settings), states)


def _tokens(rows: list[torch.Tensor]) -> list[int]:
    return [int(r.argmax()) for r in rows]


@pytest.mark.parametrize("dtype,n_prompt,moved_after", [("float32", 11, 1), ("bfloat16", 14, 2)])
def test_resume_replays_to_the_uninterrupted_logits(dtype: str, n_prompt: int, moved_after: int) -> None:
    settings = SETTINGS.model_copy(update={"dtype": dtype})
    rng = random.Random(n_prompt)
    st = TokenState(tuple(rng.randrange(3, ARCH.vocab_size) for _ in range(n_prompt)), (),
                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), 1)
    full = _logits({"x": st}, settings)["x"]
    assert len(full) == 4
    outs = tuple(_tokens(full))
    # moved after some tokens, resumed alone and next to other requests: the rest is identical
    moved = TokenState(st.prompt_ids, outs[:moved_after], st.params, st.seed)
    reqs = _requests()
    for company in ({}, {k: reqs[k] for k in ("r0", "r3")}):
        rows = _logits({"x": moved, **company}, settings)["x"]
        assert len(rows) == 4 - moved_after
        assert all(torch.equal(a, b) for a, b in zip(rows, full[moved_after:])), f"with {sorted(company)}"
    # what the replay avoids: prompt + outputs prefilled as one prompt gives other logits here
    once = _logits({"x": TokenState(st.prompt_ids + outs[:moved_after], (), st.params, st.seed)}, settings)["x"]
    assert not torch.equal(once[0], full[moved_after])


def test_replay_steps_follow_the_request() -> None:
    # prompt 20, 3 outputs, chunks of 8: prompt in 8, 8, 4, then each output one token
    steps, computed = [], 0
    while (n := next_step_tokens(computed, 23, 20, 8)) > 0:
        steps.append(n)
        computed += n
    assert steps == [8, 8, 4, 1, 1, 1]
    # the scheduler samples only the step that computes the last known token
    s = schedule([SeqView("m", 21, 23, prompt_len=20)], [], 4, 16, chunk_size=8)
    assert [(x.start, x.length, x.sample) for x in s.seqs] == [(21, 1, False)]
    s = schedule([SeqView("m", 22, 23, prompt_len=20)], [], 4, 16, chunk_size=8)
    assert [(x.start, x.length, x.sample) for x in s.seqs] == [(22, 1, True)]
