"""OpenAI wire formats: request bodies (validated strictly), response and chunk shapes, the error envelope.

Requests are pydantic models in strict mode, so a string where a number belongs is a 400 naming
the field rather than a silent coercion, and a lone UTF-16 surrogate anywhere in a string (JSON's
``"\ud800"``, which no UTF-8 text can hold) is a 400 naming the field before any tokenizer sees
it. Unknown fields are ignored (clients send ``user`` and friends). Sampling fields a client leaves
unset are None here: the handlers fill them from the model's own generation defaults, else
OpenAI's (``GenerationHandler.sampling``).
Limits that need the model (context length) are checked later, by the endpoint handlers
(``serve/api``), with the tokenizer.

Responses are TypedDicts: typed for the checker, plain dicts at run time (no per-token model
validation on the streaming path). The builders in ``serve/api`` write their keys in the order
declared here, which is the order on the wire.
"""

from __future__ import annotations

import re
from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lambdascale.engine.sampling import MAX_LOGPROBS

_MAX_SEED = 2**63 - 1


_SURROGATE = re.compile("[\ud800-\udfff]")
#: most choices one request may ask for (``n``, ``best_of``): each is admitted as a request of its
#: own, so this bounds one request's share of a model's queue (OpenAI's own limit is 128)
MAX_CHOICES = 16
#: most ``logit_bias`` entries: each is applied to every draw of the request (OpenAI documents none;
#: 1024 covers banning or boosting every form of a few hundred words)
MAX_LOGIT_BIAS = 1024


def _surrogate_at(v: Any, path: str) -> str | None:
    """The dotted path of the first string in ``v`` holding a lone surrogate (keys included), or None."""
    if isinstance(v, str):
        return path if _SURROGATE.search(v) else None
    if isinstance(v, dict):
        for k, x in v.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return sub
            found = _surrogate_at(x, sub)
            if found:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _surrogate_at(x, f"{path}.{i}")
            if found:
                return found
    return None


class LoneSurrogate(ValueError):
    """A request string holds a lone surrogate; ``path`` is the field's dotted path inside its model."""

    def __init__(self, path: str) -> None:
        path = _printable(path)  # a dict key may hold the surrogate; pydantic cannot carry it in a message
        super().__init__(f"'{path}' holds a lone UTF-16 surrogate (not valid Unicode text)")
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_at(data, "")
        if where:
            raise LoneSurrogate(where)
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    # None: the model's generation default, else OpenAI's (1.0, 1.0, off, 1.0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="-1 = off")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0, description="vLLM's; 1 = off")
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=1024, description="vLLM's")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(default=0, ge=0, le=10_000_000, description="vLLM's")
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_nonnegative(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.isascii() or not k.isdigit() or len(k) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"bias of token {k} must be in [-100, 100], got {b}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    def top_logprobs_n(self) -> int | None:
        """Top logprobs per token the client asked for (None = no logprobs); each endpoint spells it its way."""
        return None

    def prompt_logprobs_n(self) -> int | None:
        """Top logprobs per prompt token (None = none; only completions' echo asks)."""
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: a text prompt or one list of token ids."""

    prompt: str | list[int] | list[str] = Field()
    echo: bool = Field(default=False)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top logprobs per token")
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def top_logprobs_n(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of > n cannot be streamed (the best choices are known only at the end)")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported (got a list of several)")
            elif any(t < 0 for t in v):  # type: ignore[operator]
                raise ValueError("token ids must be non-negative")
        return v

    def prompt_logprobs_n(self) -> int | None:
        """``echo`` with ``logprobs``: the prompt's tokens get logprobs too (OpenAI's legacy semantics)."""
        return self.logprobs if self.echo else None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _content_somewhere(self) -> "ChatCompletionRequest":
        if all(not m.text() for m in self.messages):
            raise ValueError("messages must contain some text")
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- admin ----------------------------------------------------------------------------------

TierName = Literal["gpu", "host", "ssd"]
_DEFAULT_TIERS: tuple[TierName, ...] = ("host", "ssd")

class DeploySpec(_Strict):
    """A model registration with its scaling settings (admin API body, SQLite row)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    min_instances: int = Field(default=0, ge=0, le=1024, description="instances kept even when idle (0 = scale to zero)")
    max_instances: int = Field(default=4, ge=1, le=1024, description="most instances the autoscaler may run")
    target_concurrency: int = Field(default=4, ge=1, le=4096, description="in-flight requests per instance the autoscaler aims at")
    keep_alive_s: float = Field(default=60.0, ge=0.0, le=86_400.0, description="idle seconds before an instance is released")
    tiers: list[TierName] = Field(
        default_factory=lambda: list(_DEFAULT_TIERS), description="tiers the weights are cached in between uses"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "DeploySpec":
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) exceeds max_instances ({self.max_instances})")
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tiers has duplicates: {self.tiers}")
        return self

    def to_control(self) -> Any:
        """The control plane's ``DeploymentSpec`` (what the autoscaler and memory manager read).

        ``min_instances`` > 0 means the model never scales to zero.
        """
        from lambdascale.control.snapshot import DeploymentSpec, Tier

        return DeploymentSpec(min_instances=self.min_instances, max_instances=self.max_instances,
                              target_concurrency=self.target_concurrency, keep_alive_s=self.keep_alive_s,
                              cache_tiers=tuple(Tier(t) for t in self.tiers), scale_to_zero=self.min_instances == 0)


class UpdateSpec(_Strict):
    """Partial update of a registration (unset fields keep their value)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    min_instances: int | None = Field(default=None, ge=0, le=1024)
    max_instances: int | None = Field(default=None, ge=1, le=1024)
    target_concurrency: int | None = Field(default=None, ge=1, le=4096)
    keep_alive_s: float | None = Field(default=None, ge=0.0, le=86_400.0)
    tiers: list[TierName] | None = None


# ---- responses ------------------------------------------------------------------------------

class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int  # tokens generated, a hidden stop token included (as OpenAI counts)
    total_tokens: int


class CompletionLogprobs(TypedDict):
    """The legacy completions ``logprobs`` object: one entry per token of the choice (or chunk)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: the prompt's first token (echo), which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]
    refusal: None


class CompletionChoice(TypedDict):
    """A ``/v1/completions`` choice: the whole text, or a stream chunk's text delta."""

    index: int
    text: str
    finish_reason: str | None  # "stop" | "length"; None on a stream chunk that does not end it
    logprobs: CompletionLogprobs | None


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None


class ChatDelta(TypedDict, total=False):
    """A chat stream chunk's delta: ``role`` on the first chunk only, ``content`` when there is text."""

    role: Literal["assistant"]
    content: str


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None


class Completion(TypedDict):
    """``POST /v1/completions`` without ``stream``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletion(TypedDict):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(TypedDict):
    """One SSE event of a streamed completion (OpenAI reuses the object name ``text_completion``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    # With ``stream_options.include_usage``: null on every chunk, then the usage on a last chunk
    # whose ``choices`` is empty; absent otherwise.
    usage: NotRequired[Usage | None]


class ChatCompletionChunk(TypedDict):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage | None]


class ModelCard(TypedDict):
    """An entry of ``GET /v1/models`` and the body of ``GET /v1/models/{id}``."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int  # vLLM's: the context limit the gateway checks prompts against


class TokenizeCompletion(_Strict):
    """``POST /tokenize`` with a prompt (vLLM's shape)."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str


class TokenizeChat(_Strict):
    """``POST /tokenize`` with chat messages, rendered by the model's template (vLLM's shape)."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)


class Detokenize(_Strict):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str = Field(min_length=1, max_length=256)
    tokens: list[int] = Field(max_length=10_000_000)


def _printable(s: str) -> str:
    """``s`` with lone surrogates written as ``\\udxxx``: an error naming the client's bad input must still encode."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(s) else s


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope (text the client sent, as a field path or in the message, made encodable)."""
    return {"error": {"message": _printable(message), "type": type_,
                      "param": _printable(param) if param is not None else None, "code": code}}
