"""What ``/v1/completions`` and ``/v1/chat/completions`` share: one generation from admission to the last byte.

The request path after parsing: key check -> model lookup (404) -> prompt ids and the context
check (400) -> admission against the model's bounded queue (429 + Retry-After) -> the first token,
awaited before any header so that "no capacity" is a real 503 -> text deltas through
:class:`TextStream` (stop strings, split characters) -> one JSON body or SSE events. An endpoint
module only says how its prompt becomes token ids and how its response and chunks look
(:class:`GenerationHandler`'s abstract methods); the flow, the accounting and the SSE framing are
here, once. ``n`` (and ``best_of``) choices are that many generations of one prompt, each admitted
and seeded on its own (:func:`choice_seed`), opened, collected and streamed together.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Generic, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lambdascale.engine.sampling import TokenLogprobs, splitmix64
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
        if not watcher.cancelled():
            watcher.exception()  # retrieved: a receive that failed means the client is gone too
        raise ClientGone
    raise FirstTokenTimeout


# ---- one generation ---------------------------------------------------------------------------

#: a visible token with its logprobs, as :meth:`Generation.events` yields and records them
Entry = tuple[int, TokenLogprobs]


def choice_seed(seed: int | None, i: int) -> int | None:
    """Seed of choice ``i`` of a request seeded ``seed``: choice 0 keeps it (``n=1`` is unchanged),
    the others get a SplitMix64 mix of (seed, i), so choices are independent and reproducible.
    Unseeded requests stay unseeded (each backend request then draws a seed of its own)."""
    if seed is None or i == 0:
        return seed
    return splitmix64((seed ^ (i * 0x9E3779B97F4A7C15)) & ((1 << 64) - 1)) >> 1  # in [0, 2**63)


class Generation:
    """One admitted request in the backend: its first token, its text deltas, its metrics and its cleanup.

    Built by :func:`open_generations`, which admits it and waits for its first token. :meth:`finish`
    (counted once, whatever ends the request) releases the admission; :meth:`close` ends the
    backend's iterator and aborts the request, shielded from cancellation. ``entries`` collects
    the logprobs of the visible tokens when the request asked for them.
    """

    def __init__(self, state: GatewayState, endpoint: str, request: GenerationRequest, codec: TextCodec,
                 stops: list[str], min_tokens: int = 0, counted: bool = True) -> None:
        self._state, self._endpoint, self.request, self._codec = state, endpoint, request, codec
        self._counted = counted  # one choice of a request counts it in the requests metric
        self.t0 = state.clock.now()
        self._agen = state.backend.generate(request)
        self.stream = TextStream(codec, stops, min_tokens)
        self._last = self.t0
        self.generated = 0  # tokens generated (stop tokens included, as OpenAI counts them)
        self._released = False
        self._first: TokenEvent | None = None
        self.created = 0  # the response's ``created``, set once the first token is in
        self.entries: list[Entry] = []
        self.reason: FinishReason | None = None
        self.response_id = request.request_id  # the id the client sees (one for all choices)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    async def _pull_first(self) -> None:
        try:
            self._first = await self._agen.__anext__()
        except StopAsyncIteration:
            self._first = None

    async def _fail(self, outcome: Outcome) -> None:
        self.finish(outcome)
        await self.close()

    def finish(self, outcome: Outcome) -> None:
        """Release the admission and count the request under ``outcome``; only the first call counts."""
        if not self._released:
            self._released = True
            self._state.release(self.model)
            if self._counted:
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

    async def events(self) -> AsyncIterator[tuple[str, FinishReason | None, Entry | None]]:
        """(text delta, finish reason on the last one, the token's logprobs entry or None); ends the
        backend early on a stop string. Hidden stop tokens (EOS, stop ids) get no entry."""
        codec, stream, stop_ids = self._codec, self.stream, self.request.sampling.stop_token_ids
        ev = self._first
        while ev is not None:
            self._observe()
            self.generated += 1
            hidden = ev.finish_reason is FinishReason.STOP and (
                ev.token_id in codec.eos_token_ids or ev.token_id in stop_ids)
            delta = "" if hidden else stream.push(ev.token_id)
            entry = (ev.token_id, ev.logprobs) if ev.logprobs is not None and not hidden else None
            if entry is not None:
                self.entries.append(entry)
            if stream.stopped:
                self.reason = FinishReason.STOP
                yield delta, FinishReason.STOP, entry
                return
            if ev.finish_reason is not None:
                self.reason = ev.finish_reason
                yield delta + stream.flush(), ev.finish_reason, entry
                return
            yield delta, None, entry
            try:
                ev = await self._agen.__anext__()
            except StopAsyncIteration:
                ev = None
        self.reason = FinishReason.LENGTH
        yield stream.flush(), FinishReason.LENGTH, None

    @property
    def prompt_logprobs(self) -> tuple[TokenLogprobs, ...]:
        """The prompt's logprobs (positions 1..) the first token brought, when asked for."""
        return self._first.prompt_logprobs if self._first is not None else ()

    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for _, lp in self.entries)


def usage_of(gens: Sequence[Generation]) -> Usage:
    """One request's usage: its prompt once, every choice's generated tokens (best_of's unreturned ones too)."""
    n_prompt = len(gens[0].request.prompt_ids)
    done = sum(g.generated for g in gens)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}


async def open_generations(state: GatewayState, endpoint: str, requests: Sequence[GenerationRequest],
                           codec: TextCodec, stops: list[str], client: Request,
                           min_tokens: int = 0) -> list[Generation]:
    """Admit every request (429) and wait for each one's first token (503 when none comes, 400 when
    the engine refuses); on any failure every one of them is released and closed."""
    gens: list[Generation] = []
    try:
        for i, r in enumerate(requests):
            state.admit(r.model)
            gens.append(Generation(state, endpoint, r, codec, stops, min_tokens, counted=i == 0))
    except BaseException:  # a 429: the request is counted once, by the handler
        for g in gens:
            g._counted = False
            await g._fail(Outcome.OVERLOADED)
        raise
    model, serve = requests[0].model, state.config.serve

    async def fail(outcome: Outcome) -> None:
        for g in gens:
            await g._fail(outcome)

    try:
        await until_disconnect(client, asyncio.gather(*(g._pull_first() for g in gens)), serve.first_token_timeout_s)
    except FirstTokenTimeout:
        await fail(Outcome.UNAVAILABLE)
        raise ApiError(503, f"no first token for model '{model}' within serve.first_token_timeout_s="
                       f"{serve.first_token_timeout_s:g}s (no instance could start?)", "server_error",
                       "no_capacity", headers=state.retry_after()) from None
    except BackendUnavailableError as e:
        await fail(Outcome.UNAVAILABLE)
        raise ApiError(503, f"no capacity left for model '{model}': {e}", "server_error", "no_capacity",
                       headers=state.retry_after()) from None
    except InvalidRequestError as e:
        await fail(Outcome.BAD_REQUEST)
        raise ApiError(400, str(e), "invalid_request_error", "engine_rejected") from None
    except ModelNotServedError as e:  # undeployed between lookup and start
        await fail(Outcome.UNAVAILABLE)
        raise ApiError(503, f"model '{model}' is not served any more: {e}", "server_error", "no_capacity",
                       headers=state.retry_after()) from None
    except BaseException:
        await fail(Outcome.CLIENT_GONE)
        raise
    created = int(time.time())
    for g in gens:
        g.created = created
    return gens


async def collect_all(gens: Sequence[Generation], client: Request) -> None:
    """Run every choice to the end for a non-streamed response (503 when capacity is lost); each
    one's text is ``stream.text`` and its finish reason ``reason``."""
    async def drain(g: Generation) -> None:
        async for _ in g.events():
            pass

    try:
        await until_disconnect(client, asyncio.gather(*(drain(g) for g in gens)))
    except BackendUnavailableError as e:
        for g in gens:
            g.finish(Outcome.UNAVAILABLE)
        raise ApiError(503, f"capacity lost while generating for model '{gens[0].model}': {e}", "server_error",
                       "no_capacity", headers=gens[0]._state.retry_after()) from None
    except BaseException:
        for g in gens:
            g.finish(Outcome.CLIENT_GONE)
        raise
    finally:
        for g in gens:
            await g.close()
    for g in gens:
        g.finish(Outcome.OK)


async def merged_events(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, str, FinishReason | None, Entry | None]]:
    """Every choice's events as (choice index, delta, reason, entry), in the order they come; one
    choice is iterated directly, several through one task each. An error of any ends the stream."""
    if len(gens) == 1:
        async for delta, reason, entry in gens[0].events():
            yield 0, delta, reason, entry
        return
    q: asyncio.Queue[tuple[int, str, FinishReason | None, Entry | None] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for delta, reason, entry in g.events():
                q.put_nowait((i, delta, reason, entry))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put_nowait(e)
        finally:
            q.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    def response(self, body: Body, gens: Sequence[Generation], usage: Usage) -> Mapping[str, Any]:
        """The non-streamed body once every choice in ``gens`` (in choice order) ended."""

    @abstractmethod
    def chunk(self, gen: Generation, index: int, delta: str | None, reason: FinishReason | None,
              entry: Entry | None) -> Mapping[str, Any]:
        """One stream chunk of choice ``index`` carrying ``delta`` (and its token's logprobs), and
        ``reason`` on the choice's last one."""

    def opening_chunks(self, body: Body, gens: Sequence[Generation]) -> Sequence[Mapping[str, Any]]:
        """Chunks sent before the first text (chat: the assistant role of each choice)."""
        return []

    def best_of(self, body: Body) -> int:
        """Choices generated (``best_of`` of completions); the ``n`` most likely are returned."""
        return body.n

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
        best_of = self.best_of(body)
        if best_of > body.n and sampling.logprobs is None:
            sampling = replace(sampling, logprobs=0)  # the ranking needs each token's logprob
        rid = self.id_prefix + uuid.uuid4().hex
        reqs = [GenerationRequest(request_id=rid if best_of == 1 else f"{rid}-{i}", model=body.model,
                                  prompt_ids=tuple(ids), sampling=replace(sampling, seed=choice_seed(sampling.seed, i)))
                for i in range(best_of)]
        gens = await open_generations(self.state, self.endpoint, reqs, codec, body.stop_list(), request,
                                      sampling.min_tokens)
        for g in gens:
            g.response_id = rid
        if not body.stream:
            await collect_all(gens, request)
            chosen = gens
            if best_of > body.n:  # the n most likely by cumulative logprob, in generation order
                best = sorted(range(len(gens)), key=lambda i: -gens[i].cumulative_logprob())[:body.n]
                chosen = [gens[i] for i in sorted(best)]
            return JSONResponse(self.response(body, chosen, usage_of(gens)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse(body, gens, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    def sampling(self, body: Body, prompt_ids: list[int], codec: TextCodec) -> SamplingSpec:
        """The request's sampling: fields it sets, else the model's generation defaults
        (``codec.generation_defaults``, read from the checkpoint at import), else OpenAI's; and the
        checks that need the model (context, vocabulary) or the config (stop strings)."""
        serve = self.state.config.serve
        ctx, n, max_tokens = codec.context_length, len(prompt_ids), self.max_tokens(body)
        model_default = codec.generation_defaults
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n} tokens.",
                           "invalid_request_error", "context_length_exceeded", self.prompt_param)
        if max_tokens is None:
            max_tokens = min(model_default.get("max_tokens", serve.default_max_tokens), ctx - n)
        elif n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                           "invalid_request_error", "context_length_exceeded", "max_tokens")
        stops = body.stop_list()
        if len(stops) > serve.max_stop_strings:
            raise ApiError(400, f"at most {serve.max_stop_strings} stop strings are allowed (got {len(stops)})",
                           "invalid_request_error", None, "stop")
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})",
                           "invalid_request_error", None, "min_tokens")
        bias = body.logit_bias_pairs()
        for param, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", body.stop_token_ids or [])):
            bad = [t for t in ids if t >= codec.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} in {param} is outside the vocabulary (size {codec.vocab_size})",
                               "invalid_request_error", None, param)

        def pick(name: str, fallback: Any) -> Any:
            v = getattr(body, name)
            return v if v is not None else model_default.get(name, fallback)

        return SamplingSpec(max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
                            top_k=pick("top_k", -1), seed=body.seed, ignore_eos=body.ignore_eos,
                            stop_token_ids=tuple(body.stop_token_ids or ()),
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                            repetition_penalty=pick("repetition_penalty", 1.0), logit_bias=bias,
                            min_tokens=body.min_tokens, logprobs=body.top_logprobs_n(),
                            prompt_logprobs=body.prompt_logprobs_n())

    async def _sse(self, body: Body, gens: Sequence[Generation], include_usage: bool) -> AsyncIterator[str]:
        def framed(chunk: Mapping[str, Any]) -> str:
            return sse_event({**chunk, "usage": None} if include_usage else chunk)

        first = gens[0]
        outcome = Outcome.CLIENT_GONE
        try:
            for c in self.opening_chunks(body, gens):
                yield framed(c)
            async for i, delta, reason, entry in merged_events(gens):
                if delta or reason is not None or entry is not None:
                    yield framed(self.chunk(gens[i], i, delta, reason, entry))
            if include_usage:
                yield sse_event({"id": first.response_id, "object": self.chunk_object, "created": first.created,
                                 "model": first.model, "choices": [], "usage": usage_of(gens)}, compact=False)
            outcome = Outcome.OK
            yield SSE_DONE
        except BackendUnavailableError as e:
            # Headers are gone: end the stream with an error event the openai SDK raises as APIError.
            outcome = Outcome.UNAVAILABLE
            err = error_body(f"capacity lost while generating for model '{first.model}': {e}", "server_error", 503)
            yield sse_event(err, compact=False)
            yield SSE_DONE
        finally:
            for g in gens:
                g.finish(outcome)
                await g.close()
