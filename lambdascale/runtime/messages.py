"""Typed control messages between the controller and node agents, and their framing.

Control only: weights never travel here (they go over a :class:`~lambdascale.transfer.base.Transport`).
Framing: a 4-byte big-endian length, then the JSON of one message; the ``type`` field picks the
class. Requests from the controller carry ``req`` (an id) and are answered by a :class:`Reply`
with the same id; everything an agent reports on its own (register, heartbeat, arrivals, failures)
carries no id.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lambdascale.errors import LambdaScaleError
from lambdascale.transfer.base import PeerInfo

MAX_FRAME = 64 << 20  # a manifest of a huge model is a few MB; anything bigger is a bug or an attack
_LEN = struct.Struct("!I")


class ControlError(LambdaScaleError):
    """The control channel broke or carried something malformed."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- controller -> agent (requests) ----------------------------------------------------------

class SetPeers(_Msg):
    """Every peer's current transport address; the agent (re)adds each."""

    type: Literal["set_peers"] = "set_peers"
    req: int
    peers: list[PeerInfo]


class HoldModel(_Msg):
    """Load a model into the agent's block buffers; every chunk is verified.

    Reads from the agent's own SSD tier when it holds a copy (``runtime.agent_ssd_dir``), else from
    ``model_dir`` (the model store). ``tier`` says why the node keeps it (``runtime.agent_memory``):
    ``host`` caches it in the host tier (reserves host capacity first; refused when full),
    ``gpu`` loads it for an instance (no host capacity). With ``reuse`` a model whose buffers are
    already complete is not read again. The reply's ``source`` names where it came from.
    """

    type: Literal["hold_model"] = "hold_model"
    req: int
    model_dir: str
    tier: Literal["host", "gpu"] = "host"
    reuse: bool = Field(default=False, description="skip the read when the buffers already hold every chunk (a tier hit)")
    ssd_cap: bool = Field(
        default=True,
        description="pace the read by transfer.ssd_gbps; benchmarks turn it off to place the holders' copy "
        "before their clock starts (the setup is not what they measure)",
    )


class PrepareReceive(_Msg):
    """Preallocate receive buffers for a model described by ``manifest`` (its JSON dump)."""

    type: Literal["prepare_receive"] = "prepare_receive"
    req: int
    manifest: dict[str, Any]
    #: ``transfer.digest``'s hex digest of every chunk, from the controller's copy (None = off)
    digests: list[str] | None = None


#: Destination of a pacing entry in a :class:`SendChunks` list: ``(chunk, PACE)`` sends nothing,
#: it waits until the agent holds ``chunk`` (runtime.multicast.node_send_lists writes them).
PACE = -1


class SendChunks(_Msg):
    """Send chunks in order; each waits until this agent holds (has verified) the chunk.

    ``sends`` is a list of (chunk, destination node). A destination of ``-1`` (:data:`PACE`) sends
    nothing: it only waits until the chunk is held, so a node does not forward into a peer still
    receiving its previous round's chunk. ``epoch`` lets the controller cancel a whole generation
    of lists at once after a re-plan; ``run`` names the multicast, so two multicasts of one model
    (disjoint receivers, shared sources) keep their lists and cancellations apart.
    """

    type: Literal["send_chunks"] = "send_chunks"
    req: int
    model: str
    epoch: int = Field(ge=0)
    sends: list[tuple[int, int]]
    run: int = Field(default=0, ge=0)


class CancelSends(_Msg):
    """Stop every send list of multicast ``run`` with ``epoch <= epoch``; the reply carries the
    chunks held now."""

    type: Literal["cancel_sends"] = "cancel_sends"
    req: int
    model: str
    epoch: int
    run: int = Field(default=0, ge=0)


class GetStatus(_Msg):
    type: Literal["get_status"] = "get_status"
    req: int


class DropModel(_Msg):
    type: Literal["drop_model"] = "drop_model"
    req: int
    model: str


class GetHoldings(_Msg):
    """Ask for the node's :class:`HoldingsReport` (per model and tier: bytes, blocks, idle time)."""

    type: Literal["get_holdings"] = "get_holdings"
    req: int


class EvictModel(_Msg):
    """Drop ``model`` from ``tier``; refused (error reply, nothing freed) while that copy is in use."""

    type: Literal["evict_model"] = "evict_model"
    req: int
    model: str = Field(min_length=1)
    tier: Literal["gpu", "host", "ssd"]


class CopyBackModel(_Msg):
    """Copy ``model`` into ``to_tier`` in the background (capacity reserved first, else refused).

    ``host``: keep the buffers as a host-tier copy, every block re-verified in a worker thread;
    ``ssd``: write block files + manifest into the agent's SSD dir. Replies at once with the
    :class:`HoldingsReport` (the new copy partial until done); a copy already there or in
    progress is a no-op (``started`` false).
    """

    type: Literal["copy_back_model"] = "copy_back_model"
    req: int
    model: str = Field(min_length=1)
    to_tier: Literal["host", "ssd"]


class TierHolding(BaseModel):
    """One tier's copy of one model on a node. ``blocks`` None = complete, else blocks present so far."""

    model_config = ConfigDict(extra="forbid")

    model: str
    tier: Literal["gpu", "host", "ssd"]
    nbytes: int = Field(ge=0)
    blocks: list[int] | None = None
    idle_s: float = Field(ge=0, description="seconds since the copy last served or fed a load")
    in_use: bool = Field(description="a stage, send, receive, load or copy-back uses it: eviction is refused")


class HoldingsReport(BaseModel):
    """A node's tiers: capacities, free bytes and holdings (the memory manager's observation)."""

    model_config = ConfigDict(extra="forbid")

    node: int
    host_capacity_bytes: int = Field(ge=0)
    host_free_bytes: int = Field(ge=0)
    ssd_capacity_bytes: int = Field(ge=0)
    ssd_free_bytes: int = Field(ge=0)
    holdings: list[TierHolding] = Field(default_factory=list)
    buffers: list[str] = Field(default_factory=list, description="models whose block buffers are kept (gpu or host)")

    def tiers_of(self, model: str) -> dict[str, TierHolding]:
        return {h.tier: h for h in self.holdings if h.model == model}


class CorruptNext(_Msg):
    """Test hook: flip a byte of the next arrival of ``chunk`` (simulated wire corruption)."""

    type: Literal["corrupt_next"] = "corrupt_next"
    req: int
    model: str
    chunk: int


class FormStage(_Msg):
    """Build stage ``index`` of pipeline ``pipeline`` from held blocks ``[blocks[0], blocks[1])``.

    Hidden states go to ``next_node`` (None for the last stage) over the transport, in buffers
    named ``pipe/<pipeline>/h<i>`` (boundary i: out of stage i-1, into stage i), each holding
    ``slots`` regions of up to ``max_step_tokens`` rows of ``hidden_size`` values of ``dtype``:
    a pipeline keeps up to ``slots`` steps (micro-batches) in flight, each in its own region.
    """

    type: Literal["form_stage"] = "form_stage"
    req: int
    model: str
    pipeline: str
    index: int = Field(ge=0)
    blocks: tuple[int, int]
    next_node: int | None
    max_len: int = Field(gt=0)
    max_seqs: int = Field(gt=0)
    max_step_tokens: int = Field(gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    emulate_device: str | None = Field(default=None, description="CALIBRATION:MODEL[:SCALE] (runtime.emulation)")
    device: str = Field(
        default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
        description="where the stage computes; cuda copies each block host -> GPU as the stage forms",
    )
    batch_invariant: bool = Field(
        default=False,
        description="engine.batch_invariant numerics: each row's result independent of the batch (one torch "
                    "thread on the agent, padded projections, per-sequence attention)",
    )
    slots: int = Field(default=1, ge=1, le=64, description="steps the pipeline keeps in flight at most")


class StageStep(_Msg):
    """One step of a pipeline, sent to every stage at once.

    ``seqs``: (seq id, start position, number of new tokens), single-token sequences first.
    Stage 0 gets the new ``token_ids`` (flat, in ``seqs`` order); the others receive hidden
    states ``[N, hidden]`` from their predecessor over the transport, tagged with ``step``. The
    last stage samples one token per sequence from ``sample`` = (SamplingParams as a dict,
    seed, token index) and replies ``{"tokens": [...]}``, plus ``"logprobs"`` (per sequence
    ``[logprob, [[id, logprob], ...]]`` or null) when a sequence asked for them. ``history`` (per
    sequence: prompt ids or null, output ids before this token or null) and ``eos`` (the model's
    EOS ids) come only when a sequence's params read them (penalties, ``min_tokens``).
    ``prompt_targets`` (per sequence: the prompt tokens its rows predict, or null) asks the last
    stage for every row's logits of those sequences; the reply's ``"prompt_logprobs"`` has, per
    sequence, null or one ``[logprob, [[id, logprob], ...]]`` per target. ``release`` frees KV of finished or
    moved sequences first. ``slot`` names the region of the hidden-state buffers this step uses
    (the controller gives each step in flight its own; see ``FormStage.slots``). A stage runs its
    steps one at a time; steps in flight hold disjoint sequences.
    """

    type: Literal["stage_step"] = "stage_step"
    req: int
    pipeline: str
    index: int = Field(ge=0, description="which stage of the pipeline (a node may host several)")
    step: int = Field(ge=0)
    seqs: list[tuple[str, int, int]]
    token_ids: list[int] | None = None
    sample: list[tuple[dict[str, Any], int, int]] | None = None
    history: list[tuple[list[int] | None, list[int] | None]] | None = None
    eos: list[int] = Field(default_factory=list)
    prompt_targets: list[list[int] | None] | None = None
    release: list[str] = Field(default_factory=list)
    slot: int = Field(default=0, ge=0)


class DissolveStage(_Msg):
    """Drop this agent's stages of ``pipeline`` (their KV caches and hidden-state buffers)."""

    type: Literal["dissolve_stage"] = "dissolve_stage"
    req: int
    pipeline: str


class ExportKv(_Msg):
    """Copy the KV cache of ``seqs`` from stage ``index`` of ``pipeline`` into a new local buffer.

    Layout of ``buffer``: for each sequence in order, for each of the stage's layers, K then V,
    each ``[n_kv_heads, length, head_dim]`` contiguous in the stage's dtype. Replies
    ``{"nbytes", "layers", "lengths": {seq: tokens}, "dtype"}``. Used to ship KV on dissolution.
    """

    type: Literal["export_kv"] = "export_kv"
    req: int
    pipeline: str
    index: int = Field(ge=0)
    seqs: list[str] = Field(min_length=1)
    buffer: str = Field(min_length=1)


class RegisterBuffer(_Msg):
    """Register a zeroed receive buffer of ``nbytes`` under ``buffer`` (replies with the peer info)."""

    type: Literal["register_buffer"] = "register_buffer"
    req: int
    buffer: str = Field(min_length=1)
    nbytes: int = Field(gt=0)


class SendBuffer(_Msg):
    """Send all of local ``buffer`` to the same-named buffer on ``dst``, then free it here."""

    type: Literal["send_buffer"] = "send_buffer"
    req: int
    buffer: str = Field(min_length=1)
    dst: int = Field(ge=0)


class ImportKv(_Msg):
    """Install shipped KV into stage ``index`` of ``pipeline``, then free the buffers.

    ``parts`` = (buffer, layers) in layer order, each laid out as :class:`ExportKv` writes it for
    the same ``seqs`` (seq, length) order; their layers add up to the stage's.
    """

    type: Literal["import_kv"] = "import_kv"
    req: int
    pipeline: str
    index: int = Field(ge=0)
    seqs: list[tuple[str, int]] = Field(min_length=1)
    parts: list[tuple[str, int]] = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Warmup(_Msg):
    """Import the engine (torch) now, so forming a stage later costs no import time."""

    type: Literal["warmup"] = "warmup"
    req: int


class Shutdown(_Msg):
    type: Literal["shutdown"] = "shutdown"
    req: int


class Ping(_Msg):
    """Are you there? (the controller's probe of a live node when another process registers as it)"""

    type: Literal["ping"] = "ping"
    req: int


class Welcome(_Msg):
    """The controller's answer to a :class:`Register`: the incarnation the agent now is. The agent
    stamps every message of this session with it; a refused registration gets no answer (the
    channel closes)."""

    type: Literal["welcome"] = "welcome"
    incarnation: int = Field(ge=1)


# ---- agent -> controller ---------------------------------------------------------------------

#: Every agent -> controller message but ``Register`` carries ``inc``: the incarnation of the session
#: it belongs to (:class:`Welcome`). The controller drops any whose ``inc`` is not the node's current
#: one, so nothing an earlier incarnation sends after it was declared dead reaches its state.
def _incarnation() -> Any:
    return Field(default=0, ge=0, description="incarnation of the sending session (Welcome)")


class Register(_Msg):
    """First message of a session. ``incarnation``: the one this process last held (0 = never
    registered); ``holdings``: what the node holds now, its SSD files verified against their
    checksums (the report a rejoining node is admitted with)."""

    type: Literal["register"] = "register"
    node: int
    pid: int
    peer: PeerInfo
    incarnation: int = Field(default=0, ge=0)
    holdings: HoldingsReport | None = None


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    node: int
    inc: int = _incarnation()


class ChunkHeld(_Msg):
    """A chunk arrived from ``src`` and its xxh64 matched: it may be used and forwarded."""

    type: Literal["chunk_held"] = "chunk_held"
    node: int
    inc: int = _incarnation()
    model: str
    chunk: int
    src: int


class ChunkCorrupt(_Msg):
    """A chunk arrived from ``src`` but its xxh64 did not match: it is not held, not forwarded."""

    type: Literal["chunk_corrupt"] = "chunk_corrupt"
    node: int
    inc: int = _incarnation()
    model: str
    chunk: int
    src: int
    detail: str


class SendFailed(_Msg):
    type: Literal["send_failed"] = "send_failed"
    node: int
    model: str
    chunk: int
    dst: int
    epoch: int
    error: str
    run: int = 0
    inc: int = _incarnation()


class Reply(_Msg):
    type: Literal["reply"] = "reply"
    req: int
    inc: int = _incarnation()
    ok: bool = True
    error: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[
    Union[
        SetPeers, HoldModel, PrepareReceive, SendChunks, CancelSends, GetStatus, DropModel, CorruptNext, Shutdown, Ping,
        GetHoldings, EvictModel, CopyBackModel,
        FormStage, StageStep, DissolveStage, Warmup, ExportKv, RegisterBuffer, SendBuffer, ImportKv,
        Welcome, Register, Heartbeat, ChunkHeld, ChunkCorrupt, SendFailed, Reply,
    ],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    body = msg.model_dump_json().encode()
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> _Msg:
    try:
        return _ADAPTER.validate_json(body)
    except ValidationError as e:
        raise ControlError(f"malformed control message: {e.errors()[0]['msg']} in {body[:200]!r}") from None


async def write_msg(writer: asyncio.StreamWriter, msg: _Msg) -> None:
    writer.write(encode(msg))
    await writer.drain()


async def read_msg(reader: asyncio.StreamReader) -> _Msg | None:
    """The next message, or ``None`` when the peer closed the channel cleanly."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ControlError("control channel closed in the middle of a frame header") from None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ControlError(f"control frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ControlError(f"control channel closed in the middle of a {n}-byte frame") from None
    return decode(body)
