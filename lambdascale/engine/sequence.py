"""Requests as the engine tracks them, and the portable token state that lets one move.

:class:`TokenState` is everything needed to continue a request anywhere: prompt ids, the output
ids so far, sampling params and the resolved seed. :class:`Sequence` adds the engine-local
parts (KV progress, text emitted so far, stop-string hold-back), which a destination rebuilds
from the token state alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from lambdascale.engine.sampling import SamplingParams, TokenLogprobs
from lambdascale.model.tokenizer import IncrementalDetokenizer


class SeqStatus(str, Enum):
    """Lifecycle of a request inside one engine."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    """Why a request ended (OpenAI ``finish_reason`` values, plus abort)."""

    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or moved away


@dataclass(frozen=True)
class TokenState:
    """A request's portable state: continuing from it reproduces an uninterrupted run."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclass
class Sequence:
    """Engine-side record of one request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # output text decoded so far (stop strings cut off)
    emitted: int = 0  # characters of ``text`` already streamed out
    arrival: int = 0  # admission order (FIFO tie-break)
    prompt_lps: dict[int, TokenLogprobs] = field(default_factory=dict)  # prompt position -> its logprobs

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_state(self) -> TokenState:
        return TokenState(tuple(self.prompt_ids), tuple(self.output_ids), self.params, self.seed)


@dataclass(frozen=True)
class RequestOutput:
    """One streamed update of a request: what is new since the previous update.

    ``text`` is the new text (never part of a stop string, never half a character);
    ``token_ids`` the new token ids; ``logprobs`` one entry per new token when the request asked
    for them (``SamplingParams.logprobs``), else empty. The final update has ``finished`` set and a
    ``finish_reason``; ``token_state`` lets the caller continue the request elsewhere.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    stop_reason: int | str | None = None
    token_state: TokenState | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    #: on a request's first output token, when it asked for them: positions 1.. of the prompt
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
