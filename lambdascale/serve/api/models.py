"""``GET /v1/models``, ``GET /v1/models/{id}``, and vLLM's ``POST /tokenize`` / ``POST /detokenize``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from lambdascale.errors import InvalidRequestError
from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.api.state import GatewayState
from lambdascale.serve.backend import ModelNotServedError
from lambdascale.serve.schemas import Detokenize, ModelCard, TokenizeChat, TokenizeCompletion


class ModelsHandler:
    def __init__(self, state: GatewayState, check_key: Callable[[Request], None]) -> None:
        self.state, self.check_key = state, check_key

    def card(self, name: str) -> ModelCard:
        """A model's entry; ``max_model_len`` is its context limit (0 while the backend cannot serve it)."""
        try:
            ctx = self.state.backend.codec(name).context_length
        except ModelNotServedError:
            ctx = 0
        return {"id": name, "object": "model", "created": self.state.created, "owned_by": "lambdascale",
                "max_model_len": ctx}

    async def list_models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        return {"object": "list", "data": [self.card(name) for name in self.state.specs]}

    async def get_model(self, name: str, request: Request) -> dict[str, Any]:
        self.check_key(request)
        self.state.lookup(name)  # 404, or 503 when the backend cannot serve it
        return {**self.card(name)}

    async def tokenize(self, body: TokenizeCompletion | TokenizeChat, request: Request) -> dict[str, Any]:
        """vLLM's shape: ``{"count", "max_model_len", "tokens"}``; chat messages go through the template."""
        self.check_key(request)
        _spec, codec = self.state.lookup(body.model)
        try:
            if isinstance(body, TokenizeChat):
                ids = codec.apply_chat_template(
                    [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages])
            else:
                ids = codec.encode(body.prompt)
        except InvalidRequestError as e:  # the chat template refused the messages
            raise ApiError(400, str(e), "invalid_request_error", None, "messages") from None
        return {"count": len(ids), "max_model_len": codec.context_length, "tokens": ids}

    async def detokenize(self, body: Detokenize, request: Request) -> dict[str, Any]:
        self.check_key(request)
        _spec, codec = self.state.lookup(body.model)
        bad = [t for t in body.tokens if not 0 <= t < codec.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {codec.vocab_size})",
                           "invalid_request_error", None, "tokens")
        return {"prompt": codec.decode(body.tokens)}
