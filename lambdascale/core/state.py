"""What the serving core keeps: requests, serving units (full instances and λPipe pipelines),
deployments, settings and counters.

A *unit* is anything that serves a model's requests: a full instance (one stage holding every
block) or an execution pipeline (stages on several nodes, formed while the model multicasts).
Both run the same :class:`~lambdascale.runtime.pipeline.PipelineServer` over a
:class:`~lambdascale.runtime.pipeline.RemotePipeline`; the core never distinguishes them except
where the mechanism does (pipelines dissolve, full instances receive shipped KV).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lambdascale.control.snapshot import DeploymentSpec
from lambdascale.engine.sampling import SamplingParams, TokenLogprobs
from lambdascale.engine.sequence import TokenState
from lambdascale.model.manifest import Manifest
from lambdascale.pipe.serving import KvPolicy

if TYPE_CHECKING:
    from lambdascale.config import LambdaScaleConfig
    from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StageDtype


class Finish(str, Enum):
    """Why a request ended (the values are OpenAI's ``finish_reason``)."""

    STOP = "stop"      # an EOS or stop token id
    LENGTH = "length"  # max_tokens or the context limit


@dataclass(frozen=True, slots=True)
class TokenOut:
    """One token of one request, as the core hands it to the request's sink."""

    token_id: int
    index: int            # position in the request's output (0 = first token)
    finish: Finish | None
    unit: str             # the unit that computed it
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # on the first token: prompt positions 1.., when asked for


#: Receives a request's tokens in order, or one exception that ends the request.
RequestSink = Callable[[TokenOut | BaseException], None]


@dataclass(eq=False)
class Request:
    """The core's record of one request: its token state, which is all it needs to resume anywhere."""

    rid: str
    model: str
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    out: list[int]
    sink: RequestSink
    done: bool = False
    next_logprobs: TokenLogprobs | None = None  # the logprobs of the token about to be delivered
    prompt_lps: dict[int, TokenLogprobs] = field(default_factory=dict)  # prompt position -> logprobs (idempotent)

    def token_state(self) -> TokenState:
        return TokenState(self.prompt, tuple(self.out), self.params, self.seed)


@dataclass(eq=False)
class Unit:
    """A full instance (one stage) or a λPipe pipeline (several), with its worker task.

    ``loading``: a placeholder while the node loads the model (no pipe yet). ``helpers``: nodes
    that lend a pipeline a stage while serving the model alone (they keep no slots for it).
    """

    id: str
    model: str
    node: int                                    # first stage's node
    stages: tuple[tuple[int, int, int], ...] = ()  # (node, first block, end block); () = full on ``node``
    helpers: frozenset[int] = frozenset()
    pipe: "RemotePipeline | None" = None
    server: "PipelineServer | None" = None
    task: "asyncio.Task[None] | None" = None
    alive: bool = True
    loading: bool = False
    draining: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held for a step; dissolution waits for it
    members: dict[int, int] = field(default_factory=dict)  # node -> the incarnation its stages were formed on
    started_at: float | None = None  # when it began taking requests (core clock)
    first_request_at: float | None = None  # when the first request was dispatched to it (core clock)
    requests_taken: int = 0          # requests dispatched to it
    forming_s: float = 0.0           # how long its stages took to form

    @property
    def pipelined(self) -> bool:
        return len(self.stages) > 1

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(n for n, _, _ in self.stages)) if self.stages else (self.node,)

    @property
    def serving(self) -> bool:
        return self.alive and not self.loading and self.server is not None


@dataclass(eq=False)
class Deployment:
    """One model on the cluster: its queue (FIFO of request ids) and its units."""

    name: str
    spec: DeploymentSpec
    model_dir: Path
    manifest: Manifest
    eos: frozenset[int]
    max_len: int
    queue: deque[str] = field(default_factory=deque)
    units: list[Unit] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    last_request_at: float | None = None

    @property
    def serving(self) -> list[Unit]:
        """Units that take requests (loaded, not draining)."""
        return [u for u in self.units if not u.loading and not u.draining]


@dataclass(frozen=True)
class CoreSettings:
    """What the core runs units with, read from the one config tree (``from_config``).

    Every field is a config field; nothing here has a default of its own.
    """

    max_seqs: int                # engine.max_batch_size: sequences of a full instance
    max_step_tokens: int         # engine.max_num_batched_tokens
    dtype: "StageDtype"          # engine.dtype (auto = float32 on CPU stages)
    device: str                  # engine.device (auto = cpu: agents' stages compute on the CPU)
    batch_invariant: bool        # engine.batch_invariant
    emulate_device: str | None   # runtime.emulate_device: every stage step lasts the calibrated GPU time
    kv_move: KvPolicy            # runtime.kv_move
    link_gbps: float | None      # transfer.link_gbps (the ship-or-recompute estimate's link)
    pipeline_batch: str          # runtime.pipeline_batch
    microbatches: int            # runtime.pipeline_microbatches
    helper_blocks: int           # runtime.pipeline_helper_blocks
    execute_while_load: bool     # serve.execute_while_load
    warm_agents: bool            # serve.warm_agents

    @classmethod
    def from_config(cls, cfg: "LambdaScaleConfig") -> "CoreSettings":
        return cls(
            max_seqs=cfg.engine.max_batch_size, max_step_tokens=cfg.engine.max_num_batched_tokens,
            dtype="float32" if cfg.engine.dtype == "auto" else cfg.engine.dtype,
            device="cuda" if cfg.engine.device == "cuda" else "cpu",
            batch_invariant=cfg.engine.batch_invariant, emulate_device=cfg.runtime.emulate_device,
            kv_move=KvPolicy(cfg.runtime.kv_move), link_gbps=cfg.transfer.link_gbps,
            pipeline_batch=cfg.runtime.pipeline_batch, microbatches=cfg.runtime.pipeline_microbatches,
            helper_blocks=cfg.runtime.pipeline_helper_blocks, execute_while_load=cfg.serve.execute_while_load,
            warm_agents=cfg.serve.warm_agents,
        )


@dataclass
class CoreStats:
    """Cumulative counters (the gateway's /metrics and ``bench scale``'s report read them)."""

    requeued: int = 0               # requests sent back through the queue (a lost unit, or moved without KV)
    requests_moved: int = 0         # requests that left a unit before finishing (dissolution or failure)
    kv_shipped: int = 0             # dissolution: requests whose KV went to a full instance
    kv_recomputed: int = 0          # dissolution: requests moved without their KV (recomputed on arrival)
    kv_bytes_shipped: int = 0
    bytes_multicast: int = 0
    pipelines_formed: int = 0
    pipelines_dissolved: int = 0
    units_failed: int = 0           # units whose member died mid-step
    scale_events: dict[str, int] = field(default_factory=dict)  # "up"/"down"
    tier_hits: dict[str, int] = field(default_factory=dict)     # where each start loaded from
    memory_ops: dict[str, int] = field(default_factory=lambda: {
        "evicted": 0, "evict_refused": 0, "copy_backs": 0, "copy_back_refused": 0})
    node_lost_at: dict[int, float] = field(default_factory=dict)  # node -> when a scale-out learned of its loss
    nodes_lost: int = 0             # members declared dead (each incarnation once)
    nodes_rejoined: int = 0         # new incarnations admitted after the first

    @property
    def kv_moves(self) -> dict[str, int]:
        return {"shipped": self.kv_shipped, "recomputed": self.kv_recomputed}


#: how many ended units the core remembers (for reports; a long-running gateway forgets the oldest)
UNIT_HISTORY = 10_000
