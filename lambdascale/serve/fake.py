"""A deterministic serving backend with no model: tests, fuzzing and gateway-overhead benchmarks.

It behaves like a cluster of ``n_instances`` full instances with ``slots_per_instance`` sequences
each: requests beyond the free slots wait in a FIFO; tokens are a pure function of the token
state (prompt ids, seed, temperature, index), exactly the property the real engine guarantees, so
a request moved to another instance mid-stream continues identically. Tests can pause token
production, kill instances (their requests move, or fail with 503 when none is left) and observe
aborts.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lambdascale.control.timeline import ScaleTimeline
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.backend import (
    BackendStatus,
    BackendUnavailableError,
    FinishReason,
    GenerationRequest,
    InstanceInfo,
    InstanceState,
    ModelCapacity,
    ModelNotServedError,
    NodeInfo,
    Tier,
    TokenEvent,
)

if TYPE_CHECKING:
    from lambdascale.engine.sampling import TokenLogprobs

#: Generated tokens are drawn from these bytes, so every output decodes to plain text.
_ALPHABET = b"abcdefghijklmnopqrstuvwxyz "


class FakeCodec:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 = EOS, 257 = BOS."""

    EOS = 256
    BOS = 257

    def __init__(self, context_length: int = 512) -> None:
        self.context_length = context_length
        self.vocab_size = 258
        self.eos_token_ids = frozenset({self.EOS})
        self.generation_defaults: dict[str, object] = {}  # tests set the model's own defaults here

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return self.encode(text)


def fake_token(prompt_ids: Sequence[int], index: int, temperature: float, seed: int | None) -> int:
    """The fake model's token at output position ``index``: a pure function of the token state.

    Greedy (temperature 0) ignores the seed, as a real argmax would.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(len(prompt_ids).to_bytes(4, "little"))
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt_ids))
    h.update(index.to_bytes(4, "little"))
    if temperature > 0:
        h.update(int(seed if seed is not None else 0).to_bytes(8, "little", signed=True))
    return _ALPHABET[int.from_bytes(h.digest(), "little") % len(_ALPHABET)]


def fake_logprobs(token: int, n: int) -> "TokenLogprobs":
    """The fake model's logprobs of ``token``: -0.5 for it, then the next alphabet letters, each 1 lower."""
    from lambdascale.engine.sampling import TokenLogprobs

    others = [c for c in _ALPHABET if c != token]
    top = [(token, -0.5)] + [(c, -1.5 - k) for k, c in enumerate(others)]
    return TokenLogprobs(-0.5, tuple(top[:n]))


@dataclass
class _Instance:
    instance_id: str
    node_id: str
    slots: int
    alive: bool = True
    running: set[str] = field(default_factory=set)


class FakeBackend:
    """See the module docstring. ``token_delay_s`` paces tokens in real time (0 = as fast as possible)."""

    def __init__(
        self,
        n_instances: int = 1,
        slots_per_instance: int = 4,
        token_delay_s: float = 0.0,
        context_length: int = 512,
        known_models: set[str] | None = None,
    ) -> None:
        self.token_delay_s = token_delay_s
        self._codec = FakeCodec(context_length)
        self._known = known_models
        self._instances = [_Instance(f"fake-{i}", f"node-{i}", slots_per_instance) for i in range(n_instances)]
        self._deployed: set[str] = set()
        self._queued: dict[str, int] = {}
        self._slot_freed: asyncio.Condition | None = None
        self._running_go = asyncio.Event()
        self._running_go.set()
        self._abort_flags: set[str] = set()
        self._where: dict[str, _Instance] = {}
        #: request ids whose generation ended early (client gone, abort): what tests observe.
        self.aborted: list[str] = []
        self.abort_event = asyncio.Event()
        self.moves = 0
        #: scale events to report (tests append ScaleTimeline objects and mark milestones)
        self.timelines: list[ScaleTimeline] = []
        self.started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.started = True
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for inst in self._instances:
            inst.alive = False
        await self._notify()

    async def deploy(self, spec: DeploySpec) -> None:
        name = spec.name
        if self._known is not None and name not in self._known:
            raise ModelNotServedError(f"model {name!r} is not available; known: {sorted(self._known)}")
        self._deployed.add(name)

    async def undeploy(self, name: str) -> None:
        self._deployed.discard(name)

    def codec(self, model: str) -> FakeCodec:
        if model not in self._deployed:
            raise ModelNotServedError(f"model {model!r} is not deployed")
        return self._codec

    # ---- test controls --------------------------------------------------------------------
    def pause(self) -> None:
        """Hold every running request before its next token (callable from any thread)."""
        self._threadsafe(self._running_go.clear)

    def resume(self) -> None:
        self._threadsafe(self._running_go.set)

    def _threadsafe(self, fn: Callable[[], None]) -> None:
        # asyncio primitives are not thread-safe: run on the backend's loop when called from a test thread.
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop or loop.is_closed():
            fn()
        else:
            done = threading.Event()

            def run() -> None:
                fn()
                done.set()

            loop.call_soon_threadsafe(run)
            done.wait(5)

    async def kill_instance(self, index: int) -> None:
        """Simulate a node dying: its requests move to a live instance, or fail if none has room."""
        self._instances[index].alive = False
        await self._notify()

    async def revive_instance(self, index: int) -> None:
        self._instances[index].alive = True
        await self._notify()

    # ---- serving ---------------------------------------------------------------------------
    def _cond(self) -> asyncio.Condition:
        if self._slot_freed is None:
            self._slot_freed = asyncio.Condition()
        return self._slot_freed

    async def _notify(self) -> None:
        cond = self._cond()
        async with cond:
            cond.notify_all()

    def _free_instance(self) -> _Instance | None:
        live = [i for i in self._instances if i.alive and len(i.running) < i.slots]
        return min(live, key=lambda i: len(i.running)) if live else None

    def _any_alive(self) -> bool:
        return any(i.alive for i in self._instances)

    async def _acquire(self, request_id: str, model: str) -> _Instance | None:
        cond = self._cond()
        self._queued[model] = self._queued.get(model, 0) + 1
        try:
            async with cond:
                while True:
                    if request_id in self._abort_flags:
                        return None
                    if not self._any_alive():
                        raise BackendUnavailableError(f"no live instance left for model {model!r}")
                    inst = self._free_instance()
                    if inst is not None:
                        inst.running.add(request_id)
                        self._where[request_id] = inst
                        return inst
                    await cond.wait()
        finally:
            self._queued[model] -= 1

    def _release(self, request_id: str) -> None:
        inst = self._where.pop(request_id, None)
        if inst is not None:
            inst.running.discard(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if request.model not in self._deployed:
            raise ModelNotServedError(f"model {request.model!r} is not deployed")
        sp = request.sampling
        rid = request.request_id
        finished = False
        try:
            inst = await self._acquire(rid, request.model)
            if inst is None:
                return
            index = len(request.output_ids)
            context_left = self._codec.context_length - len(request.prompt_ids)
            limit = min(sp.max_tokens, context_left)
            while index < limit:
                await self._running_go.wait()
                if self.token_delay_s > 0:
                    await asyncio.sleep(self.token_delay_s)
                if rid in self._abort_flags:
                    return
                if not inst.alive:
                    # Move with the token state: the continuation is a pure function of it.
                    self._release(rid)
                    inst = await self._acquire(rid, request.model)
                    if inst is None:
                        return
                    self.moves += 1
                tok = fake_token(request.prompt_ids, index, sp.temperature, sp.seed)
                stop = (tok in sp.stop_token_ids) or (not sp.ignore_eos and tok in self._codec.eos_token_ids)
                last = stop or index + 1 >= limit
                reason = (FinishReason.STOP if stop else FinishReason.LENGTH) if last else None
                prompt_lps: "tuple[TokenLogprobs, ...]" = ()
                if sp.prompt_logprobs is not None and index == 0:
                    prompt_lps = tuple(fake_logprobs(t, sp.prompt_logprobs) for t in request.prompt_ids[1:])
                yield TokenEvent(token_id=tok, index=index, finish_reason=reason,
                                 logprobs=fake_logprobs(tok, sp.logprobs) if sp.logprobs is not None else None,
                                 prompt_logprobs=prompt_lps)
                index += 1
                if last:
                    finished = True
                    return
        finally:
            self._release(rid)
            self._abort_flags.discard(rid)
            if not finished:
                self.aborted.append(rid)
                self.abort_event.set()
            # Wake waiters without awaiting (finally may run inside a cancelled task).
            asyncio.get_running_loop().create_task(self._notify())

    async def abort(self, request_id: str) -> None:
        self._abort_flags.add(request_id)
        await self._notify()

    def capacity(self, model: str) -> ModelCapacity:
        live = [i for i in self._instances if i.alive]
        return ModelCapacity(
            slots=sum(i.slots for i in live),
            running=sum(len(i.running) for i in live),
            queued=self._queued.get(model, 0),
        )

    def status(self) -> BackendStatus:
        models = tuple(sorted(self._deployed))
        return BackendStatus(
            nodes=tuple(
                NodeInfo(node_id=i.node_id, alive=i.alive, state="alive" if i.alive else "dead", tiers={m: (Tier.HOST,) for m in models} if i.alive else {})
                for i in self._instances
            ),
            instances=tuple(
                InstanceInfo(i.instance_id, m, InstanceState.FULL, (i.node_id,), len(i.running))
                for i in self._instances if i.alive for m in models
            ),
            queues={m: self._queued.get(m, 0) for m in models},
            scale_events={"up": len(self.timelines)} if self.timelines else {},
            timeline=tuple(self.timelines),
        )
