"""``GET /v1/models`` and ``GET /v1/models/{id}``: the deployed models in OpenAI's list format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from lambdascale.serve.api.state import GatewayState
from lambdascale.serve.schemas import ModelCard


class ModelsHandler:
    def __init__(self, state: GatewayState, check_key: Callable[[Request], None]) -> None:
        self.state, self.check_key = state, check_key

    def card(self, name: str) -> ModelCard:
        return {"id": name, "object": "model", "created": self.state.created, "owned_by": "lambdascale"}

    async def list_models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        return {"object": "list", "data": [self.card(name) for name in self.state.specs]}

    async def get_model(self, name: str, request: Request) -> dict[str, Any]:
        self.check_key(request)
        self.state.lookup(name)  # 404, or 503 when the backend cannot serve it
        return {**self.card(name)}
