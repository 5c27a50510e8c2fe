"""The contract between the gateway and whatever produces tokens.

The gateway speaks OpenAI HTTP on one side and :class:`ServingBackend` on the other. A backend
takes a request's *token state* (prompt ids, ids already generated, sampling parameters) and
streams :class:`TokenEvent` s. Because seeded sampling is a pure function of (logits, params,
seed, token index), a request's token state fully determines its continuation; a backend that
spans several instances may therefore move a request between them mid-stream (a pipeline
dissolving, a node dying) and the stream the gateway sees is unchanged. The gateway never needs
to know where a request runs.

Three backends implement it: :class:`lambdascale.serve.fake.FakeBackend` (deterministic, no
model: tests and overhead benchmarks), :class:`lambdascale.serve.engine_backend.EngineBackend`
(the in-process engine over a full model) and, later, one over the runtime's node agents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, Sequence, runtime_checkable

from lambdascale.control.timeline import ScaleTimeline
# re-exported: defined in errors.py because the serving core raises them too
from lambdascale.errors import BackendUnavailableError, ModelNotServedError  # noqa: F401
from lambdascale.serve.schemas import DeploySpec

if TYPE_CHECKING:
    from lambdascale.engine.sampling import SamplingParams, TokenLogprobs


class FinishReason(str, Enum):
    """Why a sequence ended (OpenAI's ``finish_reason`` values)."""

    STOP = "stop"        # an EOS / stop token id (stop *strings* are matched by the gateway)
    LENGTH = "length"    # max_tokens or the context limit reached


class InstanceState(str, Enum):
    """State of a serving unit, as the control plane names it."""

    LOADING = "loading"
    PIPELINED = "pipelined"
    FULL = "full"


class Tier(str, Enum):
    """Memory tiers a model can be cached in."""

    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters as the gateway validated them (mapped 1:1 onto the engine's SamplingParams).

    ``max_tokens`` counts tokens to generate *in total* for the request, including any already in
    :attr:`GenerationRequest.output_ids`. Stop strings are not here: the gateway matches them on
    the detokenized text, so every backend gets them for free.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per token (0 = the token's own only; None = none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo + logprobs)

    def params(self) -> "SamplingParams":
        """The engine's :class:`SamplingParams` (every backend with a real model maps through here)."""
        from lambdascale.engine.sampling import SamplingParams

        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            seed=self.seed, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias, min_tokens=self.min_tokens,
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A request's full token state: enough to start it, or to resume it anywhere."""

    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingSpec
    output_ids: tuple[int, ...] = ()  # tokens already streamed to the client (resume after a move)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``finish_reason`` is set on the last token of the sequence."""

    token_id: int
    index: int                      # position in the output (0 = first generated token)
    finish_reason: FinishReason | None = None
    logprobs: "TokenLogprobs | None" = None  # when the request asked for them
    #: on the first token, when asked for: the prompt's positions 1.. (position 0 has none)
    prompt_logprobs: "tuple[TokenLogprobs, ...]" = ()


@dataclass(frozen=True)
class ModelCapacity:
    """How much a model can take right now; the gateway bounds its queue with it.

    ``slots`` = sequences the model's current (and starting) instances run concurrently;
    ``queued`` = requests the backend holds waiting for a slot.
    """

    slots: int
    running: int
    queued: int


@dataclass(frozen=True)
class InstanceInfo:
    """One serving unit: a full instance on a node, or a pipeline across nodes."""

    instance_id: str
    model: str
    state: InstanceState
    nodes: tuple[str, ...]
    running: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """A node and which tier holds which model on it."""

    node_id: str
    alive: bool
    tiers: dict[str, tuple[Tier, ...]] = field(default_factory=dict)  # model -> tiers holding it (none when dead)
    state: str = "alive"      # membership: alive | suspect | dead | rejoining
    incarnation: int = 0      # grows on every (re)join
    restarts: int = 0         # times its agent was restarted by the gateway's supervisor


@dataclass(frozen=True)
class BackendStatus:
    """What ``lambdascale status`` and ``/metrics`` show about the serving side."""

    nodes: tuple[NodeInfo, ...] = ()
    instances: tuple[InstanceInfo, ...] = ()
    queues: dict[str, int] = field(default_factory=dict)       # model -> queued requests
    bytes_multicast: int = 0                                      # cumulative
    kv_moves: dict[str, int] = field(default_factory=dict)       # "shipped"/"recomputed" -> requests, cumulative
    kv_bytes_shipped: int = 0                                     # cumulative
    scale_events: dict[str, int] = field(default_factory=dict)   # "up"/"down" -> cumulative count
    tier_hits: dict[str, int] = field(default_factory=dict)      # tier name -> cumulative starts served from it
    timeline: tuple[ScaleTimeline, ...] = ()                      # recent scale-outs, oldest first


@runtime_checkable
class TextCodec(Protocol):
    """Tokenizer of one model: text <-> ids and the chat template."""

    eos_token_ids: frozenset[int]
    context_length: int
    vocab_size: int
    #: the model's own generation defaults (``model.generation.GenerationDefaults`` fields that
    #: are set: temperature, top_p, top_k, repetition_penalty, max_tokens); the gateway uses them
    #: for what a request leaves unset
    generation_defaults: dict[str, Any]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (with the model's BOS if it uses one)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's template, ready for the assistant's turn."""
        ...


@runtime_checkable
class ServingBackend(Protocol):
    """What the gateway needs from a serving side. All methods are called on the gateway's loop."""

    async def start(self) -> None:
        """Acquire resources (processes, models); called once before serving."""
        ...

    async def close(self) -> None:
        """Release everything; in-flight streams end with :class:`BackendUnavailableError`."""
        ...

    async def deploy(self, spec: DeploySpec) -> None:
        """Make ``spec.name`` servable with these scaling settings; called again on update (idempotent).

        Raises :class:`ModelNotServedError` if the model cannot exist here (no checkpoint).
        """
        ...

    async def undeploy(self, name: str) -> None:
        """Stop serving ``name``; in-flight requests of it are aborted."""
        ...

    def codec(self, model: str) -> TextCodec:
        """The tokenizer of a deployed model (raises :class:`ModelNotServedError`)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the tokens of ``request`` after its ``output_ids``.

        Raises :class:`BackendUnavailableError` (before or during the stream) when no capacity is
        left. Closing the iterator early (``aclose``) must abort the request and free its slot and
        KV cache.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request if it still runs (idempotent)."""
        ...

    def capacity(self, model: str) -> ModelCapacity:
        """Current slots/running/queued of a model."""
        ...

    def status(self) -> BackendStatus:
        """Nodes, tiers, instances, queues and counters for status and metrics."""
        ...
