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

Penalties, ``logit_bias`` and ``min_tokens`` are :func:`process_logits`, a pure function
``logits -> logits`` of (params, the request's token history, the stop ids) applied before the
draw (greedy rows included), so they too depend only on the token state. A future token mask (a
grammar's) is one more step at the end of :func:`process_logits`. Logprobs, when asked for, are the
model's raw distribution (``log_softmax`` of the logits before any processing), as vLLM returns by
default (``logprobs_mode=raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Sequence

from lambdascale.errors import InvalidRequestError

if TYPE_CHECKING:  # numpy and torch are imported where sampling happens, so the CLI parser stays light
    import numpy as np
    import torch

_MASK64 = (1 << 64) - 1
#: most top logprobs a request may ask for (OpenAI's ``top_logprobs`` limit, vLLM's default ``max_logprobs``)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI-compatible semantics).

    temperature 0 means greedy; top_k 0 disables top-k; top_p 1.0 disables nucleus filtering.
    ``stop`` strings end generation and never appear in the output text; ``stop_token_ids``
    (plus the model's EOS unless ``ignore_eos``) end it without emitting their text.

    Logit processing (:func:`process_logits`, OpenAI's and vLLM's semantics): ``logit_bias``
    adds to chosen tokens' logits; ``min_tokens`` forbids the stop ids (stop_token_ids, plus EOS
    unless ignore_eos) until that many tokens exist; ``repetition_penalty`` divides positive and
    multiplies negative logits of every token seen in the prompt or the output (1 = off);
    ``frequency_penalty`` subtracts ``count`` times itself and ``presence_penalty`` itself once from
    each token already generated. ``logprobs``: how many top alternatives to report per token
    (0 = the sampled token's logprob only; None = no logprobs).
    """

    max_tokens: int = field(default=256, metadata={"help": "most new tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = all"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed; None = random per request"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop strings (not included in the output)"})
    stop_token_ids: tuple[int, ...] = field(default=(), metadata={"help": "token ids that end generation"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past the EOS token"})
    presence_penalty: float = field(default=0.0, metadata={"help": "subtracted once from each generated token's logit, [-2, 2]"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtracted per occurrence of a generated token, [-2, 2]"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divides logits of tokens seen (prompt and output), (0, 2]; 1 = off"})
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={"help": "(token id, bias in [-100, 100]) pairs"})
    min_tokens: int = field(default=0, metadata={"help": "tokens generated before a stop token may be drawn"})
    logprobs: int | None = field(default=None, metadata={"help": "top logprobs per token, [0, 20]; None = none"})
    prompt_logprobs: int | None = field(default=None, metadata={"help": "top logprobs per prompt token, [0, 20]; None = none"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in self.logit_bias)))
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        bad = [(t, b) for t, b in self.logit_bias if t < 0 or not -100.0 <= b <= 100.0]
        if bad:
            raise InvalidRequestError(f"logit_bias entry {bad[0]} needs a token id >= 0 and a bias in [-100, 100]")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise InvalidRequestError("logit_bias names a token id twice")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_output(self) -> bool:
        """Whether :func:`process_logits` reads the generated tokens."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_prompt(self) -> bool:
        """Whether :func:`process_logits` reads the prompt (only the repetition penalty does)."""
        return self.repetition_penalty != 1.0

    @property
    def processed(self) -> bool:
        """Whether :func:`process_logits` changes anything (else the logits are drawn from as they are)."""
        return self.needs_output or bool(self.logit_bias) or self.min_tokens > 0

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Per-field help text (the CLI derives its flags from it)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def splitmix64(x: int) -> int:
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
    base = np.uint64(splitmix64(splitmix64(seed & _MASK64) ^ (index & _MASK64)))
    x = base + (tokens.astype(np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)  # uint64 arrays wrap silently
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1), never 0 or 1
    return -np.log(-np.log(u))


@dataclass(frozen=True)
class History:
    """The tokens of a request that :func:`process_logits` reads at one draw.

    ``output_ids`` are the tokens generated before this one (``index`` of them); either may be
    left empty when the params do not read it (:attr:`SamplingParams.needs_prompt` /
    :attr:`SamplingParams.needs_output`), which is how the runtime keeps them off the wire.
    """

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()


NO_HISTORY = History()


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The model's log-probability of a drawn token and its ``top`` alternatives (descending)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Sampled:
    """One draw: the token, and its logprobs when the request asked for them; ``prompt`` the
    logprobs of the prompt tokens this step's rows predicted (``SamplingParams.prompt_logprobs``)."""

    token: int
    logprobs: TokenLogprobs | None = None
    prompt: tuple[TokenLogprobs, ...] = ()


def stop_ids(params: SamplingParams, eos_ids: Collection[int]) -> frozenset[int]:
    """Token ids that end a request: its ``stop_token_ids``, plus the model's EOS unless ``ignore_eos``."""
    ids = frozenset(params.stop_token_ids)
    return ids if params.ignore_eos else ids | frozenset(eos_ids)


def process_logits(logits: torch.Tensor, params: SamplingParams, index: int, history: History = NO_HISTORY,
                   eos_ids: Collection[int] = ()) -> torch.Tensor:
    """The logits the draw sees: a pure function of (logits [V], params, output index, history, EOS ids).

    Returns a new float64 tensor [V] (the input is not modified). Steps, in vLLM's order:
    ``logit_bias``, ``min_tokens`` (the stop ids get -inf while ``index < min_tokens``), then the
    repetition penalty over prompt and output tokens, then frequency and presence penalties over
    the output tokens. Ids outside the vocabulary are ignored (the gateway refuses them first).
    """
    import torch
    x = logits.detach().to("cpu", torch.float64).clone()  # [V]
    v = x.numel()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < v], dtype=torch.long)
        bias = torch.tensor([b for t, b in params.logit_bias if t < v], dtype=torch.float64)
        x[ids] += bias
    if index < params.min_tokens:
        banned = [t for t in stop_ids(params, eos_ids) if 0 <= t < v]
        if banned:
            x[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    out = torch.tensor(list(history.output_ids), dtype=torch.long) if params.needs_output else None
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(history.prompt_ids), dtype=torch.long)
        seen = torch.unique(torch.cat([seen, out]) if out is not None else seen)
        seen = seen[(seen >= 0) & (seen < v)]
        vals = x[seen]
        x[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if out is not None and out.numel() and (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0):
        out = out[(out >= 0) & (out < v)]
        ids, counts = torch.unique(out, return_counts=True)
        x[ids] -= params.frequency_penalty * counts.to(torch.float64) + params.presence_penalty
    return x


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    """The raw model logprob of ``token`` and the ``n`` most likely tokens (logits [V], before processing)."""
    import torch
    lp = torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1)  # [V]
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        vals, ids = torch.topk(lp, min(n, lp.numel()))
        top = tuple((int(i), float(p)) for i, p in zip(ids.tolist(), vals.tolist()))
    return TokenLogprobs(float(lp[token]), top)


def prompt_token_logprobs(logits: torch.Tensor, targets: Sequence[int], n: int) -> tuple[TokenLogprobs, ...]:
    """Raw logprob of ``targets[r]`` under row r of ``logits`` [R, V] (R >= len(targets)), with each
    row's top ``n``: the prompt logprobs of the prompt tokens those rows predict."""
    import torch
    if not targets:
        return ()
    lp = torch.log_softmax(logits[: len(targets)].detach().to("cpu", torch.float32), dim=-1)  # [T, V]
    picked = lp[torch.arange(len(targets)), torch.tensor(list(targets), dtype=torch.long)].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
    if n > 0:
        vals, ids = torch.topk(lp, min(n, lp.shape[1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return tuple(TokenLogprobs(float(p), t) for p, t in zip(picked, tops))


def prompt_targets(prompt: Sequence[int], start: int, length: int) -> list[int]:
    """The prompt tokens that rows ``[start, start + length)`` of a step predict (row j predicts
    position j + 1), in row order."""
    return list(prompt[start + 1: min(start + length + 1, len(prompt))])


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, index: int,
                 history: History = NO_HISTORY, eos_ids: Collection[int] = ()) -> int:
    """Pick one token from ``logits`` [vocab] (pure: same inputs, same token).

    Order: :func:`process_logits` (when the params change anything), temperature, then top-k and
    top-p as thresholds on the tempered logits (top-p on the distribution top-k left; tokens tied
    with the last one kept are kept too), then Gumbel-max with :func:`gumbel_noise`. Greedy ties
    break to the lowest token id (as ``argmax`` does).
    """
    import numpy as np
    import torch
    if params.processed:
        logits = process_logits(logits, params, index, history, eos_ids)
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
    if params.processed:  # tokens processing forbade (-inf) are never drawn, whatever their noise
        finite = torch.isfinite(x)
        keep = finite if keep is None else keep & finite
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


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], indices: Sequence[int],
    histories: Sequence[History] | None = None, eos_ids: Collection[int] = (),
) -> list[Sampled]:
    """One :class:`Sampled` per row of ``logits`` [B, vocab]; plain greedy rows share one argmax.

    ``histories[i]`` is row i's :class:`History` (default: empty, enough for params that read
    none); ``eos_ids`` are the model's EOS ids (what ``min_tokens`` forbids besides stop_token_ids).
    """
    import torch
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
    hist = histories if histories is not None else [NO_HISTORY] * len(params)
    plain = [p.greedy and not p.processed for p in params]
    greedy_ids = torch.argmax(logits, dim=-1).tolist() if any(plain) else []
    out = []
    for i, p in enumerate(params):
        tok = int(greedy_ids[i]) if plain[i] else sample_token(logits[i], p, seeds[i], indices[i], hist[i], eos_ids)
        lps = token_logprobs(logits[i], tok, p.logprobs) if p.logprobs is not None else None
        out.append(Sampled(tok, lps))
    return out


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], indices: Sequence[int],
    histories: Sequence[History] | None = None, eos_ids: Collection[int] = (),
) -> list[int]:
    """Sample one token per row of ``logits`` [B, vocab] (:func:`sample_rows` without the logprobs)."""
    return [s.token for s in sample_rows(logits, params, seeds, indices, histories, eos_ids)]
