"""Sampling parameters and the sampler.

Seeded sampling is a pure function of ``(logits, params, seed, index)`` where ``index`` is the
position of the token in the request's output. Nothing depends on which other requests shared
the batch, on how many steps ran before, or on a generator's hidden state, so a request's token
state (prompt ids, output ids, params, seed) fully determines its continuation: it can move to
another instance mid-stream and continue exactly as an uninterrupted run would.

The draw is Gumbel-max over the tokens that temperature, top-k and top-p keep: the token with the
largest ``logit / temperature + g`` wins, where ``g`` is Gumbel noise keyed by ``(seed, index,
token id)`` (a SplitMix64 stream in numpy's wrapping uint64 arithmetic, the same on every machine).
That samples exactly from the filtered softmax, and it tolerates logits that differ in their last
bits, as a GPU's kernels make them when a row shares its batch with different rows: the winner
changes only if the best two scores are that close, which at float32 precision almost never
happens. An inverse-CDF draw does not tolerate it: near-equal logits swap places in the sorted
order, and the draw lands on the other one (measured: ``bench/bench_sampler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Sequence

from lambdascale.errors import InvalidRequestError

if TYPE_CHECKING:  # numpy and torch are imported where sampling happens, so the CLI parser stays light
    import numpy as np
    import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI-compatible semantics).

    temperature 0 means greedy; top_k 0 disables top-k; top_p 1.0 disables nucleus filtering.
    ``stop`` strings end generation and never appear in the output text; ``stop_token_ids``
    (plus the model's EOS unless ``ignore_eos``) end it without emitting their text.
    """

    max_tokens: int = field(default=256, metadata={"help": "most new tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = all"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed; None = random per request"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop strings (not included in the output)"})
    stop_token_ids: tuple[int, ...] = field(default=(), metadata={"help": "token ids that end generation"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past the EOS token"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Per-field help text (the CLI derives its flags from it)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's stream increment


def gumbel_noise(seed: int, index: int, tokens: np.ndarray) -> np.ndarray:
    """Gumbel(0, 1) noise for ``tokens`` (int ids) at output ``index`` of a request seeded ``seed``.

    Token ``t`` gets the ``t + 1``-th value of a SplitMix64 stream started from ``(seed, index)``,
    so the noise of a token does not depend on which other tokens are asked for. float64, [len].
    """
    import numpy as np
    base = np.uint64(_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)))
    x = base + (tokens.astype(np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)  # uint64 arrays wrap silently
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1), never 0 or 1
    return -np.log(-np.log(u))


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """Pick one token from ``logits`` [vocab] (pure: same inputs, same token).

    Order: temperature, then top-k and top-p as thresholds on the tempered logits (top-p on the
    distribution top-k left; tokens tied with the last one kept are kept too), then Gumbel-max
    with :func:`gumbel_noise`. Greedy ties break to the lowest token id (as ``argmax`` does).
    """
    import numpy as np
    import torch
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.detach().to("cpu", torch.float64) / params.temperature  # [V]
    keep: torch.Tensor | None = None  # None: every token
    if params.top_k and params.top_k < x.numel():
        keep = x >= torch.topk(x, params.top_k).values[-1]
    if params.top_p < 1.0:
        kept = x if keep is None else x[keep]
        lse = torch.logsumexp(kept, dim=0)
        vals = _nucleus_candidates(kept, lse, params.top_p)
        cum = torch.cumsum(torch.exp(vals - lse), dim=0)
        # the smallest prefix whose mass reaches top_p (at least one token)
        n = min(int(torch.searchsorted(cum, torch.tensor(params.top_p, dtype=cum.dtype))) + 1, vals.numel())
        above = x >= vals[n - 1]
        keep = above if keep is None else keep & above
    if keep is None:
        idx = np.arange(x.numel())
        scores = x.numpy() + gumbel_noise(seed, index, idx)
    else:
        idx = keep.nonzero().squeeze(1).numpy()  # [K] token ids
        scores = x.numpy()[idx] + gumbel_noise(seed, index, idx)
    return int(idx[int(np.argmax(scores))])


#: tokens looked at first for the nucleus; a flatter distribution falls back to a full sort
_NUCLEUS_FIRST_LOOK = 1024


def _nucleus_candidates(x: torch.Tensor, lse: torch.Tensor, top_p: float) -> torch.Tensor:
    """The largest values of ``x`` (whose logsumexp is ``lse``), descending, enough of them to hold
    ``top_p`` of the mass.

    A trained model's nucleus is a few hundred tokens at most: a top-k of 1024 finds it without
    sorting the vocabulary. Only a flatter distribution (a random-weight model's) pays the sort.
    """
    import torch
    if x.numel() > _NUCLEUS_FIRST_LOOK:
        vals = torch.topk(x, _NUCLEUS_FIRST_LOOK).values
        if float(torch.exp(vals - lse).sum()) >= top_p:
            return vals
    return torch.sort(x, descending=True).values


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], indices: Sequence[int]
) -> list[int]:
    """Sample one token per row of ``logits`` [B, vocab]; greedy rows share one argmax."""
    import torch
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
    greedy_ids = torch.argmax(logits, dim=-1).tolist() if any(p.greedy for p in params) else []
    return [
        int(greedy_ids[i]) if p.greedy else sample_token(logits[i], p, seeds[i], indices[i])
        for i, p in enumerate(params)
    ]
