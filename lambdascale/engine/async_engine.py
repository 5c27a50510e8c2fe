"""An asyncio-friendly wrapper: the engine loop runs in one worker thread.

Why a thread: a step is a blocking torch call (milliseconds to seconds); running it on the event
loop would stall the gateway. The engine itself is single-threaded: only the worker touches it.
Callers talk to it through a command queue (add, abort) whose results come back as futures, and
every request's deltas are delivered to its own ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. Cancelling or closing a request's async iterator aborts the
request, freeing its KV cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from lambdascale.engine.engine import Engine, Prompt
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import RequestOutput, TokenState


@dataclass
class _Command:
    fn: Callable[[Engine], Any]
    future: concurrent.futures.Future


_STOP = object()


class AsyncEngine:
    """Runs :class:`Engine` in a background thread; ``generate`` is an async iterator of deltas."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[_Command | object] = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lambdascale-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (unfinished requests are aborted) and join it."""
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def __aenter__(self) -> "AsyncEngine":
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # ---- worker ----------------------------------------------------------------------------
    def _apply(self, cmd: _Command) -> None:
        try:
            cmd.future.set_result(cmd.fn(self.engine))
        except BaseException as e:  # handed to the caller, who re-raises it
            cmd.future.set_exception(e)

    def _run(self) -> None:
        eng = self.engine
        while True:
            try:
                # block only when idle; otherwise take what is queued and keep stepping
                item = self._commands.get(block=not eng.has_unfinished)
            except queue.Empty:
                item = None
            if item is _STOP:
                for rid in list(self._sinks):
                    out = eng.abort(rid)
                    if out is not None:
                        self._deliver(out)
                return
            if isinstance(item, _Command):
                self._apply(item)
                continue  # drain all queued commands before the next step
            try:
                outs = eng.step()
            except BaseException as e:  # a bug: fail every waiting stream loudly, keep no state
                self._error = e
                for rid in list(self._sinks):
                    self._deliver_error(rid, e)
                return
            for out in outs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self._sinks.pop(out.request_id, None)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _deliver_error(self, rid: str, err: BaseException) -> None:
        with self._lock:
            sink = self._sinks.pop(rid, None)
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, err)

    async def _call(self, fn: Callable[[Engine], Any]) -> Any:
        if self._error is not None:
            raise RuntimeError("engine loop failed earlier") from self._error
        if self._thread is None:
            raise RuntimeError("AsyncEngine is not started")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command(fn, fut))
        return await asyncio.wrap_future(fut)

    # ---- API -------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        request_id: str | None = None,
        resume: TokenState | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas. Bad input raises ``InvalidRequestError`` on first iteration."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def add(eng: Engine) -> str:
            rid = eng.resume(resume, request_id) if resume is not None else eng.add_request(
                prompt, params, request_id=request_id, messages=messages
            )
            with self._lock:  # registered before the worker's next step can produce output
                self._sinks[rid] = (loop, q)
            return rid

        rid = await self._call(add)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("engine loop failed") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                with self._lock:
                    self._sinks.pop(rid, None)
                if self._thread is not None and self._error is None:
                    fut: concurrent.futures.Future = concurrent.futures.Future()
                    self._commands.put(_Command(lambda eng: eng.abort(rid), fut))

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its stream ends with a final ``abort`` delta."""
        out = await self._call(lambda eng: eng.abort(request_id))
        if out is not None:
            self._deliver(out)
        return out

    async def token_state(self, request_id: str) -> TokenState:
        return await self._call(lambda eng: eng.token_state(request_id))
