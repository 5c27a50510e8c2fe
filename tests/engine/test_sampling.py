"""Sampling is a pure function of (logits, params, seed, index)."""

from __future__ import annotations

import math

import pytest
import torch

import numpy as np

from lambdascale.engine.sampling import SamplingParams, gumbel_noise, sample_batch, sample_token
from lambdascale.errors import InvalidRequestError


def _logits(seed: int = 0, v: int = 50) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 2


def test_same_inputs_same_token_and_index_matters() -> None:
    lg = _logits()
    p = SamplingParams(temperature=2.0)  # flat enough that 40 draws see many tokens
    draws = [sample_token(lg, p, seed=7, index=i) for i in range(40)]
    assert draws == [sample_token(lg, p, seed=7, index=i) for i in range(40)]
    assert len(set(draws)) > 5  # it really samples
    assert draws != [sample_token(lg, p, seed=8, index=i) for i in range(40)]


def test_batch_composition_does_not_change_a_row() -> None:
    lg = torch.stack([_logits(i) for i in range(4)])
    ps = [SamplingParams(temperature=0.7, top_p=0.9, seed=1), SamplingParams(temperature=0.0),
          SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=1.0)]
    seeds, idx = [1, 2, 3, 4], [0, 5, 9, 2]
    together = sample_batch(lg, ps, seeds, idx)
    alone = [sample_token(lg[i], ps[i], seeds[i], idx[i]) for i in range(4)]
    assert together == alone
    assert together[1] == int(lg[1].argmax())


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    lg = _logits(3)
    best = int(lg.argmax())
    for i in range(20):
        assert sample_token(lg, SamplingParams(temperature=2.0, top_k=1), 5, i) == best
        assert sample_token(lg, SamplingParams(temperature=2.0, top_p=1e-6), 5, i) == best


def test_top_k_restricts_support() -> None:
    lg = _logits(4)
    top3 = set(torch.topk(lg, 3).indices.tolist())
    got = {sample_token(lg, SamplingParams(temperature=5.0, top_k=3), 11, i) for i in range(200)}
    assert got == top3


def test_frequencies_follow_the_softmax() -> None:
    lg = torch.tensor([0.0, 1.0, 2.0, -1.0])
    probs = torch.softmax(lg, 0).tolist()
    n = 4000
    counts = [0] * 4
    for i in range(n):
        counts[sample_token(lg, SamplingParams(temperature=1.0), 123, i)] += 1
    for c, p in zip(counts, probs):
        # 5 standard deviations of a binomial
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_gumbel_noise_is_keyed_per_token_and_has_gumbel_moments() -> None:
    ids = np.arange(20000)
    g = gumbel_noise(9, 3, ids)
    assert np.isfinite(g).all()
    assert abs(g.mean() - 0.5772) < 0.03 and abs(g.var() - math.pi**2 / 6) < 0.08  # Euler's gamma, pi^2/6
    # a token's noise does not depend on which other tokens are asked for, or in what order
    assert np.array_equal(gumbel_noise(9, 3, ids[[7, 19999, 5]]), g[[7, 19999, 5]])
    assert not np.array_equal(gumbel_noise(9, 4, ids[:100]), g[:100])  # the index matters
    assert not np.array_equal(gumbel_noise(10, 3, ids[:100]), g[:100])  # so does the seed


def test_small_differences_in_the_logits_do_not_change_the_token() -> None:
    # a flat distribution over a real vocabulary (a random-weight model's), and logits that differ
    # by about 1e-5 relative, as a GPU kernel's float32 results do when a row's batch changes. An
    # inverse-CDF draw picked another token in 47 of 200 draws here (bench/bench_sampler.py)
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(151936, generator=g) * 0.5
    bumped = lg * (1 + torch.randn(lg.shape, generator=g) * 1e-5)
    assert not torch.equal(lg, bumped)
    for p in (SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.0, top_k=5000)):
        a = [sample_token(lg, p, 17, i) for i in range(200)]
        assert a == [sample_token(bumped, p, 17, i) for i in range(200)]
        assert len(set(a)) > 150  # and it really samples


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"stop": ("",)}, "stop"), ({"seed": -1}, "seed")],
)
def test_bad_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("scale", [0.5, 4.0])  # a flat nucleus (most of the vocabulary), a peaked one (~100 tokens)
def test_nucleus_first_look_keeps_the_same_tokens_as_a_full_sort(scale: float, monkeypatch) -> None:
    from lambdascale.engine import sampling

    lg = torch.randn(151936, generator=torch.Generator().manual_seed(1)) * scale
    p = SamplingParams(temperature=0.8, top_p=0.95)
    fast = [sample_token(lg, p, 3, i) for i in range(30)]
    monkeypatch.setattr(sampling, "_NUCLEUS_FIRST_LOOK", 10**9)  # always sort everything
    assert fast == [sample_token(lg, p, 3, i) for i in range(30)]
    vals, ids = torch.sort(torch.softmax(lg.double() / 0.8, 0), descending=True)
    assert set(fast) <= set(ids[: int((vals.cumsum(0) < 0.95).sum()) + 1].tolist())  # drawn from the nucleus


@pytest.mark.parametrize("budget", [512, 8])  # one prefill, or chunks of 8 tokens
def test_prompt_logprobs_equal_a_full_forward_and_penalties_change_only_the_draw(budget: int, tmp_path) -> None:
    """``prompt_logprobs``: one raw logprob per prompt position 1.., chunked or not, delivered with
    the first token; a logit_bias changes the drawn token but not the (raw) logprobs reported."""
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.settings import EngineSettings
    from lambdascale.engine.stage import SeqSlice, StageBatch
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path)
    eng = Engine.from_checkpoint(ck.dir, EngineSettings(device="cpu", max_num_batched_tokens=budget, max_batch_size=2))
    prompt = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41]
    outs = list(eng.generate(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, logprobs=1)))
    assert [len(o.prompt_logprobs) for o in outs] == [len(prompt) - 1, 0, 0]
    st = eng.runner.stages[0]
    full = torch.log_softmax(st.forward(StageBatch((SeqSlice("ref", 0, len(prompt)),)), torch.tensor(prompt),
                                        all_logits=True), -1)  # [L, V]
    st.release("ref")
    got = outs[0].prompt_logprobs
    assert [g.logprob for g in got] == pytest.approx([float(full[j - 1, prompt[j]]) for j in range(1, len(prompt))], abs=1e-5)
    assert all(len(g.top) == 2 and g.top[0][1] >= g.top[1][1] for g in got)
    first = outs[0].token_ids[0]
    biased = list(eng.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=0,
                                                      logit_bias=((first, -100.0),))))
    assert biased[0].token_ids[0] != first  # the draw saw the bias; the reported logprob is the raw one
    assert biased[0].logprobs[0].logprob == pytest.approx(float(torch.log_softmax(
        st.forward(StageBatch((SeqSlice("ref", 0, len(prompt)),)), torch.tensor(prompt)), -1)[0, biased[0].token_ids[0]]), abs=1e-5)
