"""Sampling is a pure function of (logits, params, seed, index)."""

from __future__ import annotations

import math

import pytest
import torch

from lambdascale.engine.sampling import SamplingParams, sample_batch, sample_token, uniform
from lambdascale.errors import InvalidRequestError


def _logits(seed: int = 0, v: int = 50) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 2


def test_same_inputs_same_token_and_index_matters() -> None:
    lg = _logits()
    p = SamplingParams(temperature=1.0)
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


def test_uniform_is_in_range_and_spread() -> None:
    us = [uniform(9, i) for i in range(2000)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.03


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"stop": ("",)}, "stop"), ({"seed": -1}, "seed")],
)
def test_bad_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)
