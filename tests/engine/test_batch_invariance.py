"""``engine.batch_invariant``: a request's logits do not depend on which requests share its batch.

The model is a small random qwen2-shaped one (q/k/v bias, tied embeddings, GQA) with a vocabulary
of 8192, wide enough that the LM head's matmul shows row-count-dependent kernels without the mode.
Logits (not just tokens) are compared bitwise: one request alone, then in batches with 3 others at
different positions, and with a step token budget small enough to chunk its prefill.
"""

from __future__ import annotations

import pytest
import torch

from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.scheduler import SeqView, schedule
from lambdascale.engine.sequence import TokenState
from lambdascale.engine.settings import EngineSettings
from lambdascale.model.arch import SHAPES
from lambdascale.model.llama import expected_shapes, invariant_linear

ARCH = SHAPES["tiny-qwen2"].model_copy(update={"vocab_size": 8192, "hidden_size": 128,
                                               "intermediate_size": 256, "num_hidden_layers": 2})


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in expected_shapes(ARCH, (0, ARCH.num_hidden_layers), True, True).items():
        if len(shape) == 2:
            out[name] = torch.randn(*shape, generator=g) * (0.5 if "embed" in name or "lm_head" in name else 0.15)
        elif name.endswith("bias"):
            out[name] = torch.randn(*shape, generator=g) * 0.1
        else:
            out[name] = 1.0 + 0.1 * torch.randn(*shape, generator=g)
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


TENSORS = _tensors()


def _requests() -> dict[str, TokenState]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(4):
        n = 9 + 5 * i  # 9, 14, 19, 24 prompt tokens
        prompt = tuple(int(t) for t in torch.randint(3, ARCH.vocab_size, (n,), generator=g))
        params = SamplingParams(max_tokens=4, temperature=0.0 if i % 2 else 0.8, ignore_eos=True)
        out[f"r{i}"] = TokenState(prompt, (), params, 100 + i)
    return out


def logged_run(eng: Engine, states: dict[str, TokenState]) -> dict[str, list[torch.Tensor]]:
    """Run ``states`` together on ``eng`` (in dict order); every logits row each request sampled
    from, in order (the runner's results are recorded as they pass)."""
    seen: dict[str, list[torch.Tensor]] = {r: [] for r in states}
    execute = eng.runner.execute

    def spy(sched, tokens):
        res = execute(sched, tokens)
        for i, rid in enumerate(res.request_ids):
            seen[rid].append(res.logits[i].clone())
        return res

    eng.runner.execute = spy  # type: ignore[method-assign]
    for rid, st in states.items():
        eng.resume(st, request_id=rid)
    eng.run_to_completion()
    return seen


def _run(dtype: str, invariant: bool, order: list[str], budget: int = 512) -> dict[str, list[torch.Tensor]]:
    """Run ``order``'s requests together; every logits row each request sampled from, in order."""
    eng = Engine.from_tensors(ARCH, TENSORS, None, EngineSettings(
        device="cpu", dtype=dtype, batch_invariant=invariant, max_num_batched_tokens=budget, max_batch_size=8,
        threads=2,
    ))
    reqs = _requests()
    seen = logged_run(eng, {rid: reqs[rid] for rid in order})
    assert all(len(v) == 4 for v in seen.values())
    return seen


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_are_bitwise_batch_invariant(dtype: str) -> None:
    # budget 16 with max_batch_size 8: prefill chunks of 8 tokens (r3's 24-token prompt in 3)
    for budget, orders in ((512, (["r0", "r1", "r2", "r3"], ["r3", "r2", "r1", "r0"])),
                           (16, (["r1", "r0", "r3", "r2"], ["r0", "r3"]))):
        alone = {r: _run(dtype, True, [r], budget)[r] for r in ("r0", "r3")}
        for order in orders:
            batched = _run(dtype, True, order, budget)
            for r in ("r0", "r3"):
                assert _same(alone[r], batched[r]), f"{dtype}: {r} differs in batch {order} (budget {budget})"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_the_mode_batching_changes_logits(dtype: str) -> None:
    """The test above would catch a regression: with the mode off the same comparison fails."""
    alone = _run(dtype, False, ["r0"])["r0"]
    batched = _run(dtype, False, ["r1", "r0", "r3", "r2"])["r0"]
    assert not _same(alone, batched)


def test_invariant_linear_pads_small_batches() -> None:
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(512, 64, generator=g), torch.randn(6, 64, generator=g)
    big = invariant_linear(x, w)
    for m in (1, 2, 3):
        assert invariant_linear(x[:m], w).shape == (m, 512)
        assert torch.equal(invariant_linear(x[:m], w), big[:m])


def test_invariant_chunks_depend_only_on_the_request() -> None:
    # request b's prompt of 30 tokens: chunks of 8 whatever else is in the step; a chunk that
    # does not fit the budget left waits rather than shrinking
    out = schedule([SeqView("a", 5, 6)], [SeqView("b", 0, 30)], 4, 10, chunk_size=8)
    assert [(s.request_id, s.length) for s in out.seqs] == [("a", 1), ("b", 8)]
    out = schedule([SeqView("a", 0, 20)], [SeqView("b", 0, 30)], 4, 10, chunk_size=8)
    assert [(s.request_id, s.length) for s in out.seqs] == [("a", 8)]
    with pytest.raises(ValueError, match="chunk_size"):
        schedule([], [], 4, 10, chunk_size=11)
