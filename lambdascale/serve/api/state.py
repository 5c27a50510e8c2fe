"""What the handlers of one app share: config, backend, clock, registry, metrics and the deployments.

One :class:`GatewayState` per app (no module-level state). It owns the model lookup every
endpoint does (404 / 503), the per-model admission bound (429) and the app's start and stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from lambdascale.clock import Clock
from lambdascale.config import LambdaScaleConfig
from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.backend import ModelNotServedError, ServingBackend, TextCodec
from lambdascale.serve.metrics import GatewayMetrics, Outcome
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.timeline_log import TimelineLogger

log = logging.getLogger("lambdascale.serve")


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
    timelines: TimelineLogger = field(default_factory=TimelineLogger)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backend and deploy every registered model (one that cannot be served is logged, not fatal)."""
        await self.backend.start()
        for spec in self.registry.list():
            try:
                await self.backend.deploy(spec)
                self.specs[spec.name] = spec
            except ModelNotServedError as e:
                log.error("registered model %s cannot be served: %s", spec.name, e)

    async def close(self, close_registry: bool) -> None:
        await self.backend.close()
        if close_registry:
            self.registry.close()

    async def log_timelines(self) -> None:
        """Every scale event becomes a timeline in the log (one line per milestone, once); runs until cancelled."""
        while True:
            try:
                self.timelines.observe(self.backend.status().timeline)
            except Exception:  # never let logging kill the gateway
                log.exception("cannot read scale timelines from the backend")
            await asyncio.sleep(self.config.serve.timeline_poll_s)

    # ---- requests -----------------------------------------------------------------------------
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.serve.retry_after_s)}

    def lookup(self, model: str) -> tuple[DeploySpec, TextCodec]:
        """The deployment and codec of ``model``: 404 when it is not deployed, 503 when the backend cannot serve it."""
        spec = self.specs.get(model)
        if spec is None:
            raise ApiError(404, f"The model '{model}' does not exist; deployed: {sorted(self.specs)}",
                           "invalid_request_error", "model_not_found", "model", outcome=Outcome.NOT_FOUND)
        try:
            return spec, self.backend.codec(model)
        except ModelNotServedError as e:
            raise ApiError(503, f"model '{model}' is registered but cannot be served: {e}", "server_error",
                           "model_unavailable", headers=self.retry_after(), outcome=Outcome.UNAVAILABLE) from None

    def admit(self, model: str) -> None:
        """Count one more request in flight for ``model``, or 429 when slots + queue are all taken."""
        cap = self.backend.capacity(model)
        serve = self.config.serve
        limit = max(cap.slots, 0) + serve.max_queue_per_model
        if self.admitted.get(model, 0) >= limit:
            raise ApiError(429, f"model '{model}' is overloaded ({self.admitted.get(model, 0)} requests admitted, "
                           f"limit {limit} = {cap.slots} slots + serve.max_queue_per_model "
                           f"{serve.max_queue_per_model}); retry later",
                           "rate_limit_error", "overloaded", headers=self.retry_after(), outcome=Outcome.OVERLOADED)
        self.admitted[model] = self.admitted.get(model, 0) + 1
        self.metrics.in_flight.labels(model).inc()

    def release(self, model: str) -> None:
        self.admitted[model] -= 1
        self.metrics.in_flight.labels(model).dec()
