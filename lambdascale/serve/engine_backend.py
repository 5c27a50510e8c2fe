"""A :class:`ServingBackend` over the in-process engine: one full-model ``Engine`` per deployed model.

Each engine is driven by a worker thread of its own (schedule -> run -> postprocess in a loop,
sleeping when idle), so the gateway's event loop never blocks on torch. The loop and the thread
talk through two narrow channels: commands (add with a token state, abort) go in under a
condition variable; each step's outputs come back with one ``call_soon_threadsafe`` into
per-request asyncio queues. Only the worker thread touches the engine.

Requests enter with :meth:`Engine.resume` from their full token state, so a request that was
moved here mid-stream (``output_ids`` non-empty) continues exactly where it left off; a request
without a seed gets one here, which is what makes it movable later.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdascale.config import LambdaScaleConfig
from lambdascale.errors import LambdaScaleError
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
from lambdascale.serve.codec import TokenizerCodec
from lambdascale.serve.schemas import DeploySpec

log = logging.getLogger("lambdascale.serve.engine")

_NODE = "local"


def engine_codec(engine: Any) -> TokenizerCodec:
    """The engine's tokenizer, EOS ids, context limit and vocabulary as a :class:`TextCodec`."""
    if engine.tokenizer is None:
        raise ModelNotServedError("the model has no tokenizer; the gateway needs one for text prompts")
    return TokenizerCodec(engine.tokenizer, frozenset(engine.eos_token_ids), int(engine.max_len),
                          int(engine.arch.vocab_size), engine.generation.sampling())


@dataclass
class _Worker:
    """One engine and the thread that owns it."""

    name: str
    engine: Any
    codec: TokenizerCodec
    loop: asyncio.AbstractEventLoop
    cond: threading.Condition = field(default_factory=threading.Condition)
    commands: list[tuple[str, Any]] = field(default_factory=list)
    queues: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)
    stopping: bool = False
    thread: threading.Thread | None = None
    running: int = 0
    waiting: int = 0
    error: BaseException | None = None

    def submit(self, kind: str, payload: Any) -> None:
        with self.cond:
            self.commands.append((kind, payload))
            self.cond.notify()

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """On the event loop: route outputs/errors to their request queues."""
        for rid, item in items:
            q = self.queues.get(rid)
            if q is not None:
                q.put_nowait(item)

    def run(self) -> None:
        from lambdascale.engine.sequence import TokenState

        eng = self.engine
        try:
            while True:
                with self.cond:
                    while not self.commands and not eng.has_unfinished and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                    cmds, self.commands = self.commands, []
                failed: list[tuple[str, Any]] = []
                for kind, payload in cmds:
                    if kind == "add":
                        rid, state = payload
                        try:
                            eng.resume(state if isinstance(state, TokenState) else TokenState(**state), request_id=rid)
                        except LambdaScaleError as e:
                            failed.append((rid, e))
                    elif kind == "abort":
                        eng.abort(payload)
                if failed:
                    self.loop.call_soon_threadsafe(self._deliver, failed)
                outs = eng.step() if eng.has_unfinished else []
                self.running, self.waiting = eng.num_running, eng.num_waiting
                if outs:
                    self.loop.call_soon_threadsafe(self._deliver, [(o.request_id, o) for o in outs])
        except BaseException as e:  # a bug or an OOM in the engine: every request of it fails clearly
            log.exception("engine worker of %s died", self.name)
            self.error = e
            err = BackendUnavailableError(f"engine of model {self.name!r} failed: {e!r}")
            try:
                self.loop.call_soon_threadsafe(self._deliver, [(rid, err) for rid in list(self.queues)])
            except RuntimeError:
                pass


class EngineBackend:
    """In-process serving: one engine (one full instance) per model, on this machine."""

    def __init__(self, config: LambdaScaleConfig, models_dir: str | Path | None = None) -> None:
        self.config = config
        self.models_dir = Path(models_dir) if models_dir is not None else config.paths.models_dir
        self._workers: dict[str, _Worker] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for name in list(self._workers):
            await self.undeploy(name)

    async def deploy(self, spec: DeploySpec) -> None:
        async with self._lock:
            if spec.name in self._workers:
                return  # scaling settings do not change a single in-process instance
            from lambdascale.engine.engine import Engine
            from lambdascale.model.checkpoint import find_model

            try:
                ckpt = find_model(self.models_dir, spec.name)
            except LambdaScaleError as e:
                raise ModelNotServedError(str(e)) from None
            engine = await asyncio.to_thread(Engine.from_checkpoint, ckpt, self.config.engine)
            worker = _Worker(spec.name, engine, engine_codec(engine), asyncio.get_running_loop())
            worker.thread = threading.Thread(target=worker.run, name=f"engine-{spec.name}", daemon=True)
            worker.thread.start()
            self._workers[spec.name] = worker
            log.info("model %s loaded from %s", spec.name, ckpt.dir if hasattr(ckpt, "dir") else self.models_dir)

    async def undeploy(self, name: str) -> None:
        worker = self._workers.pop(name, None)
        if worker is None:
            return
        with worker.cond:
            worker.stopping = True
            worker.cond.notify()
        if worker.thread is not None:
            await asyncio.to_thread(worker.thread.join, 30)
        err = BackendUnavailableError(f"model {name!r} was undeployed or the backend closed")
        worker._deliver([(rid, err) for rid in list(worker.queues)])

    def _worker(self, model: str) -> _Worker:
        w = self._workers.get(model)
        if w is None:
            raise ModelNotServedError(f"model {model!r} is not loaded")
        return w

    def codec(self, model: str) -> TokenizerCodec:
        return self._worker(model).codec

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from lambdascale.engine.sequence import TokenState

        w = self._worker(request.model)
        if w.error is not None:
            raise BackendUnavailableError(f"engine of model {request.model!r} failed: {w.error!r}")
        sp = request.sampling
        params = sp.params()
        seed = sp.seed if sp.seed is not None else secrets.randbits(63)
        state = TokenState(tuple(request.prompt_ids), tuple(request.output_ids), params, seed)
        rid = request.request_id
        q: asyncio.Queue[Any] = asyncio.Queue()
        w.queues[rid] = q
        done = False
        try:
            w.submit("add", (rid, state))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                reason = None
                if item.finished:
                    done = True
                    fr = item.finish_reason.value if item.finish_reason is not None else "length"
                    if fr == "abort":
                        raise BackendUnavailableError(f"request {rid} was aborted by the engine")
                    reason = FinishReason(fr)
                for k, tok in enumerate(item.token_ids):
                    last = k == len(item.token_ids) - 1
                    yield TokenEvent(token_id=tok, index=item.num_output_tokens - len(item.token_ids) + k,
                                     finish_reason=reason if last else None,
                                     logprobs=item.logprobs[k] if k < len(item.logprobs) else None,
                                     prompt_logprobs=item.prompt_logprobs if k == 0 else ())
                if done:
                    return
        finally:
            w.queues.pop(rid, None)
            if not done:
                w.submit("abort", rid)

    async def abort(self, request_id: str) -> None:
        for w in self._workers.values():
            if request_id in w.queues:
                w.submit("abort", request_id)

    def capacity(self, model: str) -> ModelCapacity:
        w = self._workers.get(model)
        if w is None or w.error is not None:
            return ModelCapacity(slots=0, running=0, queued=0)
        return ModelCapacity(slots=self.config.engine.max_batch_size, running=w.running, queued=w.waiting)

    def status(self) -> BackendStatus:
        tier = Tier.HOST
        alive = {m: w for m, w in self._workers.items() if w.error is None}
        return BackendStatus(
            nodes=(NodeInfo(_NODE, True, {m: (tier,) for m in alive}),),
            instances=tuple(InstanceInfo(f"{m}@{_NODE}", m, InstanceState.FULL, (_NODE,), w.running)
                            for m, w in alive.items()),
            queues={m: w.waiting for m, w in self._workers.items()},
        )


__all__ = ["EngineBackend", "engine_codec"]
