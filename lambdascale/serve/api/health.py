"""``GET /health`` and ``GET /metrics``: open to probes and scrapers (no key)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import PlainTextResponse, Response

from lambdascale.serve.api.state import GatewayState


class HealthHandler:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def health(self) -> dict[str, Any]:
        st = self.state.backend.status()
        return {"status": "ok", "models": sorted(self.state.specs), "nodes_alive": sum(1 for n in st.nodes if n.alive)}

    # No docstrings on route methods: FastAPI would publish them in /openapi.json.
    async def metrics(self) -> Response:
        # Prometheus text; the backend's gauges are copied from its status on each scrape, never stale.
        self.state.metrics.refresh(self.state.backend.status(), sorted(self.state.specs))
        return PlainTextResponse(self.state.metrics.render(), media_type="text/plain; version=0.0.4")
