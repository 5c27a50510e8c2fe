"""The gateway: OpenAI-compatible inference, admin API, health and metrics, as one FastAPI app.

:func:`create_app` takes the config, a :class:`ServingBackend` and a clock, so tests run it over
the fake backend and production over the engine or the cluster. It only wires: the handler class
of each endpoint family (``serve/api``: completions, chat, models, admin, health) to its routes,
each with its key check (``/v1`` inference or admin keys, ``/admin`` admin keys, ``/health`` and
``/metrics`` open), the body-size middleware and the error handlers that give every failure
OpenAI's envelope ``{"error": {message, type, param, code}}``; no input may produce a 5xx (a fuzz
test checks). The request path itself is described in ``api/generation.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lambdascale.clock import Clock, MonotonicClock
from lambdascale.config import LambdaScaleConfig
from lambdascale.tasks import log_failure
from lambdascale.serve.api.admin import AdminHandler
from lambdascale.serve.api.auth import KeyCheck
from lambdascale.serve.api.chat import ChatHandler
from lambdascale.serve.api.completions import CompletionsHandler
from lambdascale.serve.api.errors import (
    ApiError,
    BodyLimit,
    api_error_handler,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from lambdascale.serve.api.health import HealthHandler
from lambdascale.serve.api.models import ModelsHandler
from lambdascale.serve.api.state import GatewayState
from lambdascale.serve.backend import ServingBackend
from lambdascale.serve.metrics import GatewayMetrics
from lambdascale.serve.registry import ModelRegistry


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await state.start()
        except BaseException as e:  # uvicorn only says "startup failed": keep the cause for ServerThread
            app.state.startup_error = e
            raise
        poller = asyncio.create_task(state.log_timelines())
        poller.add_done_callback(log_failure("the gateway's scale-timeline logger", logging.getLogger("lambdascale.serve")))
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await state.close(close_registry=own_registry)

    app = FastAPI(title="lambdascale gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = state

    # ---- errors and middleware ----------------------------------------------------------------
    app.exception_handler(ApiError)(api_error_handler)
    app.exception_handler(RequestValidationError)(validation_error_handler)
    app.exception_handler(StarletteHTTPException)(http_error_handler)
    app.exception_handler(Exception)(internal_error_handler)
    app.add_middleware(BodyLimit, limit=config.serve.max_request_bytes)

    # ---- auth ---------------------------------------------------------------------------------
    inference_key, admin_key = KeyCheck(config, admin=False), KeyCheck(config, admin=True)

    # ---- routes (registration order is the order of /openapi.json) ----------------------------
    completions = CompletionsHandler(state, inference_key)
    chat = ChatHandler(state, inference_key)
    models = ModelsHandler(state, inference_key)
    health = HealthHandler(state)
    admin = AdminHandler(state, admin_key)

    app.post("/v1/completions", response_model=None)(completions.completions)
    app.post("/v1/chat/completions", response_model=None)(chat.chat_completions)
    app.get("/v1/models")(models.list_models)
    app.get("/v1/models/{name}")(models.get_model)
    app.post("/tokenize")(models.tokenize)
    app.post("/detokenize")(models.detokenize)
    app.get("/health")(health.health)
    app.get("/metrics")(health.metrics)
    app.get("/admin/models")(admin.admin_list)
    app.post("/admin/models", status_code=201)(admin.admin_deploy)
    app.patch("/admin/models/{name}")(admin.admin_update)
    app.delete("/admin/models/{name}")(admin.admin_delete)
    app.get("/admin/status")(admin.admin_status)
    return app


__all__ = ["ApiError", "GatewayState", "create_app"]
