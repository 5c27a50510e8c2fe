"""Sampling parameters and the sampler.

Seeded sampling is a pure function of ``(logits, params, seed, index)`` where ``index`` is the
position of the token in the request's output. Nothing depends on which other requests shared
the batch, on how many steps ran before, or on a generator's hidden state, so a request's token
state (prompt ids, output ids, params, seed) fully determines its continuation: it can move to
another instance mid-stream and continue exactly as an uninterrupted run would.

The uniform draw comes from SplitMix64 of ``(seed, index)``, computed in Python integers, so it
is the same on every device and every torch version.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Sequence

from lambdascale.errors import InvalidRequestError

if TYPE_CHECKING:  # torch is imported where sampling happens, so the CLI parser stays light
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


def uniform(seed: int, index: int) -> float:
    """A deterministic draw in [0, 1) for token ``index`` of a request seeded with ``seed``."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 11) / float(1 << 53)


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """Pick one token from ``logits`` [vocab] (pure: same inputs, same token).

    Order: temperature, top-k, top-p (on the tempered distribution), then inverse-CDF with
    :func:`uniform`. Greedy ties break to the lowest token id (as ``argmax`` does).
    """
    import torch
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.to(torch.float64) / params.temperature  # [V]
    vals, idx = torch.sort(x, descending=True)  # stable enough: ties keep index order
    if params.top_k and params.top_k < vals.numel():
        vals, idx = vals[: params.top_k], idx[: params.top_k]
    probs = torch.softmax(vals, dim=0)  # [K]
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=0)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(torch.searchsorted(cum, torch.tensor(params.top_p, dtype=cum.dtype))) + 1
        probs, idx = probs[:keep], idx[:keep]
        probs = probs / probs.sum()
    cum = torch.cumsum(probs, dim=0)
    u = uniform(seed, index) * float(cum[-1])
    pick = min(int(torch.searchsorted(cum, torch.tensor(u, dtype=cum.dtype), right=True)), cum.numel() - 1)
    return int(idx[pick])


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
