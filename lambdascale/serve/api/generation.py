"""What ``/v1/completions`` and ``/v1/chat/completions`` share: one generation from admission to the last byte.

The request path after parsing: key check -> model lookup (404) -> prompt ids and the context
check (400) -> admission against the model's bounded queue (429 + Retry-After) -> the first token,
awaited before any header so that "no capacity" is a real 503 -> text deltas through
:class:`TextStream` (stop strings, split characters) -> one JSON body or SSE events. An endpoint
module only says how its prompt becomes token ids and how its response and chunks look
(:class:`GenerationHandler`'s abstract methods); the flow, the accounting and the SSE framing are
here, once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lambdascale.errors import InvalidRequestError
from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.api.state import GatewayState
from lambdascale.serve.backend import (
    BackendUnavailableError,
    FinishReason,
    GenerationRequest,
    ModelNotServedError,
    SamplingSpec,
    TextCodec,
    TokenEvent,
)
from lambdascale.serve.metrics import Outcome
from lambdascale.serve.schemas import ChatCompletionRequest, CompletionRequest, Usage, error_body
from lambdascale.serve.textstream import TextStream

Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest)

# ---- SSE framing ------------------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: Mapping[str, Any], compact: bool = True) -> str:
    """One ``data:`` event. Chunks are compact JSON; the usage and error events keep json's default spacing."""
    data = json.dumps(payload, separators=(",", ":")) if compact else json.dumps(payload)
    return f"data: {data}\n\n"


# ---- client disconnects -----------------------------------------------------------------------

class ClientGone(Exception):
    """The client closed the connection before the response started."""


class FirstTokenTimeout(Exception):
    """No first token within ``serve.first_token_timeout_s``."""


async def until_disconnect(request: Request, aw: Any, timeout_s: float | None = None) -> Any:
    """Await ``aw`` unless the client disconnects first; then cancel it and raise :class:`ClientGone`.

    Used before a response starts (the first token, a whole non-streamed completion): once the
    body is read, the ASGI ``receive`` only yields ``http.disconnect``, so a watcher task on it is
    a cheap way to free the request's slot and KV cache as soon as the client leaves.
    """
    task = asyncio.ensure_future(aw)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # the cancellation (or whatever the generator raised while closing)
        pass
    if watcher in done:
        raise ClientGone
    raise FirstTokenTimeout


# ---- one generation ---------------------------------------------------------------------------

class Generation:
    """One admitted request in the backend: its first token, its text deltas, its metrics and its cleanup.

    Built by :meth:`open`, which admits the request and waits for the first token. :meth:`finish`
    (counted once, whatever ends the request) releases the admission; :meth:`close` ends the
    backend's iterator and aborts the request, shielded from cancellation.
    """

    def __init__(self, state: GatewayState, endpoint: str, request: GenerationRequest, codec: TextCodec,
                 stops: list[str]) -> None:
        self._state, self._endpoint, self.request, self._codec = state, endpoint, request, codec
        self.t0 = state.clock.now()
        self._agen = state.backend.generate(request)
        self.stream = TextStream(codec, stops)
        self._last = self.t0
        self.generated = 0  # tokens generated (stop tokens included, as OpenAI counts them)
        self._released = False
        self._first: TokenEvent | None = None
        self.created = 0  # the response's ``created``, set once the first token is in

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    @classmethod
    async def open(cls, state: GatewayState, endpoint: str, request: GenerationRequest, codec: TextCodec,
                   stops: list[str], client: Request) -> Generation:
        """Admit ``request`` (429) and wait for its first token (503 when none comes, 400 when the engine refuses)."""
        state.admit(request.model)
        gen = cls(state, endpoint, request, codec, stops)
        await gen._first_token(client)
        gen.created = int(time.time())
        return gen

    async def _first_token(self, client: Request) -> None:
        model, serve = self.model, self._state.config.serve
        try:
            self._first = await until_disconnect(client, self._agen.__anext__(), serve.first_token_timeout_s)
        except StopAsyncIteration:
            self._first = None
        except FirstTokenTimeout:
            await self._fail(Outcome.UNAVAILABLE)
            raise ApiError(503, f"no first token for model '{model}' within serve.first_token_timeout_s="
                           f"{serve.first_token_timeout_s:g}s (no instance could start?)", "server_error",
                           "no_capacity", headers=self._state.retry_after()) from None
        except BackendUnavailableError as e:
            await self._fail(Outcome.UNAVAILABLE)
            raise ApiError(503, f"no capacity left for model '{model}': {e}", "server_error", "no_capacity",
                           headers=self._state.retry_after()) from None
        except InvalidRequestError as e:
            await self._fail(Outcome.BAD_REQUEST)
            raise ApiError(400, str(e), "invalid_request_error", "engine_rejected") from None
        except ModelNotServedError as e:  # undeployed between lookup and start
            await self._fail(Outcome.UNAVAILABLE)
            raise ApiError(503, f"model '{model}' is not served any more: {e}", "server_error", "no_capacity",
                           headers=self._state.retry_after()) from None
        except BaseException:
            await self._fail(Outcome.CLIENT_GONE)
            raise

    async def _fail(self, outcome: Outcome) -> None:
        self.finish(outcome)
        await self.close()

    def finish(self, outcome: Outcome) -> None:
        """Release the admission and count the request under ``outcome``; only the first call counts."""
        if not self._released:
            self._released = True
            self._state.release(self.model)
            self._state.metrics.requests.labels(self._endpoint, self.model, outcome.value).inc()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            aclose = getattr(self._agen, "aclose", None)  # async generators have it (the protocol's contract)
            if aclose is not None:
                await aclose()
            await self._state.backend.abort(self.id)

    def _observe(self) -> None:
        metrics, now = self._state.metrics, self._state.clock.now()
        if self.generated == 0:
            metrics.ttft.labels(self.model).observe(now - self.t0)
        else:
            metrics.itl.labels(self.model).observe(now - self._last)
        self._last = now
        metrics.tokens.labels(self.model).inc()

    async def events(self) -> AsyncIterator[tuple[str, FinishReason | None]]:
        """(text delta, finish reason on the last one); ends the backend early on a stop string."""
        codec, stream, stop_ids = self._codec, self.stream, self.request.sampling.stop_token_ids
        ev = self._first
        while ev is not None:
            self._observe()
            self.generated += 1
            hidden = ev.finish_reason is FinishReason.STOP and (
                ev.token_id in codec.eos_token_ids or ev.token_id in stop_ids)
            delta = "" if hidden else stream.push(ev.token_id)
            if stream.stopped:
                yield delta, FinishReason.STOP
                return
            if ev.finish_reason is not None:
                yield delta + stream.flush(), ev.finish_reason
                return
            yield delta, None
            try:
                ev = await self._agen.__anext__()
            except StopAsyncIteration:
                ev = None
        yield stream.flush(), FinishReason.LENGTH

    async def collect(self, client: Request) -> FinishReason:
        """Run to the end for a non-streamed response (503 when capacity is lost); the text is ``stream.text``."""
        async def drain() -> FinishReason | None:
            last: FinishReason | None = None
            async for _delta, r in self.events():
                last = r
            return last

        try:
            reason = await until_disconnect(client, drain())
        except BackendUnavailableError as e:
            self.finish(Outcome.UNAVAILABLE)
            raise ApiError(503, f"capacity lost while generating for model '{self.model}': {e}", "server_error",
                           "no_capacity", headers=self._state.retry_after()) from None
        except BaseException:
            self.finish(Outcome.CLIENT_GONE)
            raise
        finally:
            await self.close()
        self.finish(Outcome.OK)
        return reason or FinishReason.LENGTH

    def usage(self) -> Usage:
        n_prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": self.generated,
                "total_tokens": n_prompt + self.generated}


# ---- the endpoints' common handler ------------------------------------------------------------

class GenerationHandler(ABC, Generic[Body]):
    """A generating endpoint over the backend; subclasses give the prompt's ids and the response shapes."""

    endpoint: ClassVar[str]  # the requests metric's endpoint label
    id_prefix: ClassVar[str]  # of response ids: "cmpl-", "chatcmpl-"
    prompt_param: ClassVar[str]  # the field a too-long prompt is blamed on
    chunk_object: ClassVar[str]  # ``object`` of stream chunks

    def __init__(self, state: GatewayState, check_key: Callable[[Request], None]) -> None:
        self.state, self.check_key = state, check_key

    @abstractmethod
    def prompt_ids(self, body: Body, codec: TextCodec) -> list[int]:
        """The prompt as token ids (400 :class:`ApiError` for a prompt that cannot be run)."""

    @abstractmethod
    def max_tokens(self, body: Body) -> int | None:
        """The completion budget the client asked for (None = as much as fits, up to the default)."""

    @abstractmethod
    def response(self, gen: Generation, reason: FinishReason) -> Mapping[str, Any]:
        """The non-streamed body once ``gen`` ended for ``reason``."""

    @abstractmethod
    def chunk(self, gen: Generation, delta: str | None, reason: FinishReason | None) -> Mapping[str, Any]:
        """One stream chunk carrying ``delta``, and ``reason`` on the last one."""

    def opening_chunks(self, gen: Generation) -> Sequence[Mapping[str, Any]]:
        """Chunks sent before the first text (chat: the assistant role)."""
        return []

    async def handle(self, body: Body, request: Request) -> Response:
        """Serve one request; early failures (auth, lookup, limits) are counted here, later ones by Generation."""
        model = body.model
        try:
            try:
                return await self._serve(body, request)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; counted as client_gone by Generation
            except InvalidRequestError as e:  # e.g. the chat template rejected the messages
                raise ApiError(400, str(e), "invalid_request_error") from None
        except ApiError as e:
            if e.outcome is None:
                e.outcome = {400: Outcome.BAD_REQUEST, 404: Outcome.NOT_FOUND, 503: Outcome.UNAVAILABLE}.get(
                    e.status, Outcome.BAD_REQUEST)
            if e.code not in ("no_capacity", "engine_rejected"):  # already counted by Generation
                # Label only deployed names: user input must not create unbounded series.
                label = model if model in self.state.specs else "_unknown"
                self.state.metrics.requests.labels(self.endpoint, label, e.outcome.value).inc()
            raise

    async def _serve(self, body: Body, request: Request) -> Response:
        self.check_key(request)
        _spec, codec = self.state.lookup(body.model)
        ids = self.prompt_ids(body, codec)
        sampling = self.sampling(body, ids, codec)
        req = GenerationRequest(request_id=self.id_prefix + uuid.uuid4().hex, model=body.model,
                                prompt_ids=tuple(ids), sampling=sampling)
        gen = await Generation.open(self.state, self.endpoint, req, codec, body.stop_list(), request)
        if not body.stream:
            return JSONResponse(self.response(gen, await gen.collect(request)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse(gen, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)

    def sampling(self, body: Body, prompt_ids: list[int], codec: TextCodec) -> SamplingSpec:
        """Check the prompt and budget against the context and the stop strings against their limit."""
        serve = self.state.config.serve
        ctx, n, max_tokens = codec.context_length, len(prompt_ids), self.max_tokens(body)
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n} tokens.",
                           "invalid_request_error", "context_length_exceeded", self.prompt_param)
        if max_tokens is None:
            max_tokens = min(serve.default_max_tokens, ctx - n)
        elif n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                           "invalid_request_error", "context_length_exceeded", "max_tokens")
        stops = body.stop_list()
        if len(stops) > serve.max_stop_strings:
            raise ApiError(400, f"at most {serve.max_stop_strings} stop strings are allowed (got {len(stops)})",
                           "invalid_request_error", None, "stop")
        return SamplingSpec(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos)

    async def _sse(self, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
        def framed(chunk: Mapping[str, Any]) -> str:
            return sse_event({**chunk, "usage": None} if include_usage else chunk)

        outcome = Outcome.CLIENT_GONE
        try:
            for c in self.opening_chunks(gen):
                yield framed(c)
            async for delta, reason in gen.events():
                if delta or reason is not None:
                    yield framed(self.chunk(gen, delta, reason))
            if include_usage:
                yield sse_event({"id": gen.id, "object": self.chunk_object, "created": gen.created,
                                 "model": gen.model, "choices": [], "usage": gen.usage()}, compact=False)
            outcome = Outcome.OK
            yield SSE_DONE
        except BackendUnavailableError as e:
            # Headers are gone: end the stream with an error event the openai SDK raises as APIError.
            outcome = Outcome.UNAVAILABLE
            err = error_body(f"capacity lost while generating for model '{gen.model}': {e}", "server_error", 503)
            yield sse_event(err, compact=False)
            yield SSE_DONE
        finally:
            gen.finish(outcome)
            await gen.close()
