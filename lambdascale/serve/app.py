"""The gateway: OpenAI-compatible inference, admin API, health and metrics, as one FastAPI app.

:func:`create_app` takes the config, a :class:`ServingBackend` and a clock, so tests run it over
the fake backend and production over the engine or the cluster. The request path is:
auth -> parse (strict, 400 naming the field) -> model lookup (404) -> tokenize and check the
context (400) -> admission against the model's bounded queue (429 + Retry-After) -> stream from
the backend (503 when no capacity is left) -> detokenize with stop strings -> JSON or SSE.
Every error body is OpenAI's envelope ``{"error": {message, type, param, code}}``; no input may
produce a 5xx (a fuzz test checks).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lambdascale.clock import Clock, MonotonicClock
from lambdascale.config import LambdaScaleConfig
from lambdascale.errors import InvalidRequestError
from lambdascale.serve.backend import (
    BackendUnavailableError,
    FinishReason,
    GenerationRequest,
    ModelNotServedError,
    SamplingSpec,
    ServingBackend,
    TextCodec,
    TokenEvent,
)
from lambdascale.serve.metrics import GatewayMetrics, Outcome
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DeploySpec,
    UpdateSpec,
    error_body,
)
from lambdascale.serve.textstream import TextStream
from lambdascale.serve.timeline_log import TimelineLogger, format_timeline

log = logging.getLogger("lambdascale.serve")


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None,
        param: str | None = None, headers: dict[str, str] | None = None, outcome: Outcome | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.outcome = outcome


@dataclass
class GatewayState:
    """Everything the routes share; one per app (no module-level state)."""

    config: LambdaScaleConfig
    backend: ServingBackend
    clock: Clock
    registry: ModelRegistry
    metrics: GatewayMetrics
    specs: dict[str, DeploySpec] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)  # model -> requests admitted, not finished
    created: int = field(default_factory=lambda: int(time.time()))

    # ---- auth -------------------------------------------------------------------------------
    def _keys(self, admin: bool) -> list[str]:
        s = self.config.serve
        keys = [k.get_secret_value() for k in s.admin_api_keys]
        if not admin:
            keys += [k.get_secret_value() for k in s.api_keys]
        return keys

    def auth_enabled(self) -> bool:
        return bool(self.config.serve.api_keys or self.config.serve.admin_api_keys)

    def check_key(self, request: Request, admin: bool) -> None:
        if not self.auth_enabled():
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        ok = scheme.lower() == "bearer" and token and any(
            hmac.compare_digest(token.encode(), k.encode()) for k in self._keys(admin)
        )
        if not ok:
            # Never echo or log the presented key.
            what = "an admin API key" if admin else "a valid API key"
            raise ApiError(401, f"this endpoint needs {what} (Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key", outcome=Outcome.UNAUTHORIZED)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if param is None and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return f"request body must be a JSON object: {msg}", None
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    return f"invalid value for '{param}': {msg}{more}", param


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


class BodyLimit:
    """Pure ASGI middleware: 413 for a declared Content-Length over the limit (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for k, v in scope["headers"]:
                if k == b"content-length":
                    if not v.isdigit() or int(v) > self.limit:
                        resp = JSONResponse(error_body(
                            f"request body exceeds the {self.limit}-byte limit (serve.max_request_bytes)",
                            "invalid_request_error", "request_too_large"), 413)
                        await resp(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def create_app(
    config: LambdaScaleConfig,
    backend: ServingBackend,
    clock: Clock | None = None,
    registry: ModelRegistry | None = None,
) -> FastAPI:
    """Build the gateway app. The backend is started and the registry's models deployed on startup."""
    own_registry = registry is None
    reg = registry if registry is not None else ModelRegistry(config.serve.registry_path)
    state = GatewayState(config=config, backend=backend, clock=clock or MonotonicClock(),
                         registry=reg, metrics=GatewayMetrics())

    timeline_logger = TimelineLogger()

    async def log_timelines() -> None:
        """Every scale event becomes a timeline in the log (one line per milestone, once)."""
        while True:
            try:
                timeline_logger.observe(backend.status().timeline)
            except Exception:  # never let logging kill the gateway
                log.exception("cannot read scale timelines from the backend")
            await asyncio.sleep(config.serve.timeline_poll_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        for spec in reg.list():
            try:
                await backend.deploy(spec)
                state.specs[spec.name] = spec
            except ModelNotServedError as e:
                log.error("registered model %s cannot be served: %s", spec.name, e)
        poller = asyncio.create_task(log_timelines())
        try:
            yield
        finally:
            poller.cancel()
            await backend.close()
            if own_registry:
                reg.close()

    app = FastAPI(title="lambdascale gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state

    # ---- errors -------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        if param is None and "json" not in request.headers.get("content-type", ""):
            msg = "request body must be a JSON object sent with Content-Type: application/json"
        return JSONResponse(error_body(msg, "invalid_request_error", None, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), 500)

    app.add_middleware(BodyLimit, limit=config.serve.max_request_bytes)

    # ---- helpers ------------------------------------------------------------------------------
    def lookup(model: str) -> tuple[DeploySpec, TextCodec]:
        spec = state.specs.get(model)
        if spec is None:
            raise ApiError(404, f"The model '{model}' does not exist; deployed: {sorted(state.specs)}",
                           "invalid_request_error", "model_not_found", "model", outcome=Outcome.NOT_FOUND)
        try:
            return spec, backend.codec(model)
        except ModelNotServedError as e:
            raise ApiError(503, f"model '{model}' is registered but cannot be served: {e}", "server_error",
                           "model_unavailable", headers={"Retry-After": str(config.serve.retry_after_s)},
                           outcome=Outcome.UNAVAILABLE) from None

    def plan_tokens(body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], codec: TextCodec,
                    max_tokens: int | None) -> SamplingSpec:
        ctx = codec.context_length
        n = len(prompt_ids)
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n} tokens.",
                           "invalid_request_error", "context_length_exceeded", "messages" if
                           isinstance(body, ChatCompletionRequest) else "prompt")
        if max_tokens is None:
            max_tokens = min(config.serve.default_max_tokens, ctx - n)
        elif n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                           "invalid_request_error", "context_length_exceeded", "max_tokens")
        stops = body.stop_list()
        if len(stops) > config.serve.max_stop_strings:
            raise ApiError(400, f"at most {config.serve.max_stop_strings} stop strings are allowed (got {len(stops)})",
                           "invalid_request_error", None, "stop")
        return SamplingSpec(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos)

    def admit(model: str) -> None:
        cap = backend.capacity(model)
        limit = max(cap.slots, 0) + config.serve.max_queue_per_model
        if state.admitted.get(model, 0) >= limit:
            raise ApiError(429, f"model '{model}' is overloaded ({state.admitted.get(model, 0)} requests admitted, "
                           f"limit {limit} = {cap.slots} slots + serve.max_queue_per_model "
                           f"{config.serve.max_queue_per_model}); retry later",
                           "rate_limit_error", "overloaded",
                           headers={"Retry-After": str(config.serve.retry_after_s)}, outcome=Outcome.OVERLOADED)
        state.admitted[model] = state.admitted.get(model, 0) + 1
        state.metrics.in_flight.labels(model).inc()

    def release(model: str) -> None:
        state.admitted[model] -= 1
        state.metrics.in_flight.labels(model).dec()

    async def run(
        endpoint: str, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
        codec: TextCodec, sampling: SamplingSpec, chat: bool, request: Request,
    ) -> Response:
        model = body.model
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = GenerationRequest(request_id=rid, model=model, prompt_ids=tuple(prompt_ids), sampling=sampling)
        admit(model)
        t0 = state.clock.now()
        agen = backend.generate(req)
        stream = TextStream(codec, body.stop_list())
        timing = {"last": t0}
        counted = {"n": 0}  # tokens generated (stop tokens included, as OpenAI counts them)
        released = False

        def finish(outcome: Outcome) -> None:
            nonlocal released
            if not released:
                released = True
                release(model)
                state.metrics.requests.labels(endpoint, model, outcome.value).inc()

        def observe(ev: TokenEvent) -> None:
            now = state.clock.now()
            if counted["n"] == 0:
                state.metrics.ttft.labels(model).observe(now - t0)
            else:
                state.metrics.itl.labels(model).observe(now - timing["last"])
            timing["last"] = now
            state.metrics.tokens.labels(model).inc()

        async def close_backend() -> None:
            with anyio.CancelScope(shield=True):
                aclose = getattr(agen, "aclose", None)  # async generators have it (the protocol's contract)
                if aclose is not None:
                    await aclose()
                await backend.abort(rid)

        # First token before answering, so that "no capacity" is a real 503 status.
        try:
            first = await until_disconnect(request, agen.__anext__(), config.serve.first_token_timeout_s)
        except StopAsyncIteration:
            first = None
        except FirstTokenTimeout:
            finish(Outcome.UNAVAILABLE)
            await close_backend()
            raise ApiError(503, f"no first token for model '{model}' within serve.first_token_timeout_s="
                           f"{config.serve.first_token_timeout_s:g}s (no instance could start?)", "server_error",
                           "no_capacity", headers={"Retry-After": str(config.serve.retry_after_s)}) from None
        except BackendUnavailableError as e:
            finish(Outcome.UNAVAILABLE)
            await close_backend()
            raise ApiError(503, f"no capacity left for model '{model}': {e}", "server_error", "no_capacity",
                           headers={"Retry-After": str(config.serve.retry_after_s)}) from None
        except InvalidRequestError as e:
            finish(Outcome.BAD_REQUEST)
            await close_backend()
            raise ApiError(400, str(e), "invalid_request_error", "engine_rejected") from None
        except ModelNotServedError as e:  # undeployed between lookup and start
            finish(Outcome.UNAVAILABLE)
            await close_backend()
            raise ApiError(503, f"model '{model}' is not served any more: {e}", "server_error", "no_capacity",
                           headers={"Retry-After": str(config.serve.retry_after_s)}) from None
        except BaseException:
            finish(Outcome.CLIENT_GONE)
            await close_backend()
            raise

        async def events() -> AsyncIterator[tuple[str, FinishReason | None]]:
            """(text delta, finish reason on the last one); ends the backend early on a stop string."""
            ev = first
            while ev is not None:
                observe(ev)
                counted["n"] += 1
                hidden = ev.finish_reason is FinishReason.STOP and (
                    ev.token_id in codec.eos_token_ids or ev.token_id in sampling.stop_token_ids)
                delta = "" if hidden else stream.push(ev.token_id)
                if stream.stopped:
                    yield delta, FinishReason.STOP
                    return
                if ev.finish_reason is not None:
                    yield delta + stream.flush(), ev.finish_reason
                    return
                yield delta, None
                try:
                    ev = await agen.__anext__()
                except StopAsyncIteration:
                    ev = None
            yield stream.flush(), FinishReason.LENGTH

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": counted["n"],
                    "total_tokens": len(prompt_ids) + counted["n"]}

        created = int(time.time())
        if not body.stream:
            async def collect() -> FinishReason | None:
                last: FinishReason | None = None
                async for _delta, r in events():
                    last = r
                return last

            try:
                reason = await until_disconnect(request, collect())
            except BackendUnavailableError as e:
                finish(Outcome.UNAVAILABLE)
                raise ApiError(503, f"capacity lost while generating for model '{model}': {e}", "server_error",
                               "no_capacity", headers={"Retry-After": str(config.serve.retry_after_s)}) from None
            except BaseException:
                finish(Outcome.CLIENT_GONE)
                raise
            finally:
                await close_backend()
            finish(Outcome.OK)
            fr = (reason or FinishReason.LENGTH).value
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": stream.text},
                                          "finish_reason": fr, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": stream.text, "finish_reason": fr, "logprobs": None}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model,
                                 "choices": [choice], "usage": usage()})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: FinishReason | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": reason.value if reason else None, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason.value if reason else None,
                          "logprobs": None}
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        async def sse() -> AsyncIterator[str]:
            outcome = Outcome.CLIENT_GONE
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for delta, reason in events():
                    if delta or reason is not None:
                        yield chunk(delta, reason)
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                                 "choices": [], "usage": usage()}) + "\n\n"
                outcome = Outcome.OK
                yield "data: [DONE]\n\n"
            except BackendUnavailableError as e:
                # Headers are gone: end the stream with an error event the openai SDK raises as APIError.
                outcome = Outcome.UNAVAILABLE
                err = error_body(f"capacity lost while generating for model '{model}': {e}", "server_error", 503)
                yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                finish(outcome)
                await close_backend()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def guarded(endpoint: str, model: str | None, fn: Any) -> Response:
        """Count early failures (auth, lookup, limits) by outcome; successes are counted by ``run``."""
        try:
            try:
                return await fn()
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; counted as client_gone by run()
            except InvalidRequestError as e:  # e.g. the chat template rejected the messages
                raise ApiError(400, str(e), "invalid_request_error") from None
        except ApiError as e:
            if e.outcome is None:
                e.outcome = {400: Outcome.BAD_REQUEST, 404: Outcome.NOT_FOUND, 503: Outcome.UNAVAILABLE}.get(
                    e.status, Outcome.BAD_REQUEST)
            if e.code not in ("no_capacity", "engine_rejected"):  # already counted by run()
                # Label only deployed names: user input must not create unbounded series.
                label = model if model in state.specs else "_unknown"
                state.metrics.requests.labels(endpoint, label, e.outcome.value).inc()
            raise

    # ---- inference ----------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        async def go() -> Response:
            state.check_key(request, admin=False)
            _spec, codec = lookup(body.model)
            if isinstance(body.prompt, str):
                ids = codec.encode(body.prompt)
            elif body.prompt and isinstance(body.prompt[0], str):
                ids = codec.encode(body.prompt[0])  # type: ignore[arg-type]
            else:
                ids = list(body.prompt)  # type: ignore[arg-type]
                bad = [t for t in ids if t >= codec.vocab_size]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {codec.vocab_size})",
                                   "invalid_request_error", None, "prompt")
            if not ids:
                raise ApiError(400, "prompt must not be empty", "invalid_request_error", None, "prompt")
            sampling = plan_tokens(body, ids, codec, body.max_tokens)
            return await run("completions", body, ids, codec, sampling, chat=False, request=request)
        return await guarded("completions", body.model, go)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        async def go() -> Response:
            state.check_key(request, admin=False)
            _spec, codec = lookup(body.model)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            ids = codec.apply_chat_template(messages)
            sampling = plan_tokens(body, ids, codec, body.effective_max_tokens())
            return await run("chat", body, ids, codec, sampling, chat=True, request=request)
        return await guarded("chat", body.model, go)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        state.check_key(request, admin=False)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "lambdascale"}
            for name in state.specs]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        state.check_key(request, admin=False)
        lookup(name)
        return {"id": name, "object": "model", "created": state.created, "owned_by": "lambdascale"}

    # ---- health and metrics -------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        st = backend.status()
        return {"status": "ok", "models": sorted(state.specs), "nodes_alive": sum(1 for n in st.nodes if n.alive)}

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.refresh(backend.status(), sorted(state.specs))
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- admin --------------------------------------------------------------------------------
    @app.get("/admin/models")
    async def admin_list(request: Request) -> dict[str, Any]:
        state.check_key(request, admin=True)
        return {"data": [s.model_dump() for s in state.specs.values()]}

    @app.post("/admin/models", status_code=201)
    async def admin_deploy(spec: DeploySpec, request: Request) -> dict[str, Any]:
        state.check_key(request, admin=True)
        if spec.name in state.specs:
            raise ApiError(409, f"model '{spec.name}' is already deployed; use PATCH /admin/models/{spec.name}",
                           "invalid_request_error", "already_deployed", "name")
        try:
            await backend.deploy(spec)
        except ModelNotServedError as e:
            raise ApiError(404, str(e), "invalid_request_error", "model_not_found", "name") from None
        reg.put(spec)
        state.specs[spec.name] = spec
        log.info("deployed model %s: %s", spec.name, spec.model_dump_json())
        return spec.model_dump()

    @app.patch("/admin/models/{name}")
    async def admin_update(name: str, patch: UpdateSpec, request: Request) -> dict[str, Any]:
        state.check_key(request, admin=True)
        current = state.specs.get(name)
        if current is None:
            raise ApiError(404, f"model '{name}' is not deployed; deployed: {sorted(state.specs)}",
                           "invalid_request_error", "model_not_found")
        try:
            spec = DeploySpec.model_validate(current.model_dump() | patch.model_dump(exclude_none=True))
        except ValueError as e:
            raise ApiError(400, f"invalid update for '{name}': {e}", "invalid_request_error") from None
        await backend.deploy(spec)
        reg.put(spec)
        state.specs[name] = spec
        log.info("updated model %s: %s", name, spec.model_dump_json())
        return spec.model_dump()

    @app.delete("/admin/models/{name}")
    async def admin_delete(name: str, request: Request) -> dict[str, Any]:
        state.check_key(request, admin=True)
        if name not in state.specs:
            raise ApiError(404, f"model '{name}' is not deployed; deployed: {sorted(state.specs)}",
                           "invalid_request_error", "model_not_found")
        await backend.undeploy(name)
        reg.delete(name)
        del state.specs[name]
        log.info("deleted model %s", name)
        return {"id": name, "deleted": True}

    @app.get("/admin/status")
    async def admin_status(request: Request) -> dict[str, Any]:
        state.check_key(request, admin=True)
        st = backend.status()
        return {
            "nodes": [{"node_id": n.node_id, "alive": n.alive,
                       "tiers": {m: [t.value for t in ts] for m, ts in n.tiers.items()}} for n in st.nodes],
            "instances": [asdict(i) | {"state": i.state.value, "nodes": list(i.nodes)} for i in st.instances],
            "queues": st.queues,
            "admitted": dict(state.admitted),
            "deployments": [s.model_dump() for s in state.specs.values()],
            "bytes_multicast": st.bytes_multicast,
            "kv_moves": st.kv_moves,
            "kv_bytes_shipped": st.kv_bytes_shipped,
            "scale_events": st.scale_events,
            "tier_hits": st.tier_hits,
            "timeline": [format_timeline(t) for t in st.timeline],
            "scale_timelines": [t.to_dict() for t in st.timeline],
        }

    return app


__all__ = ["ApiError", "GatewayState", "create_app"]
