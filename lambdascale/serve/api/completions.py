"""``POST /v1/completions``: a text prompt, a list of one string, or token ids."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.api.generation import Generation, GenerationHandler
from lambdascale.serve.backend import FinishReason, TextCodec
from lambdascale.serve.schemas import Completion, CompletionChunk, CompletionRequest


class CompletionsHandler(GenerationHandler[CompletionRequest]):
    endpoint = "completions"
    id_prefix = "cmpl-"
    prompt_param = "prompt"
    chunk_object = "text_completion"

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self.handle(body, request)

    def prompt_ids(self, body: CompletionRequest, codec: TextCodec) -> list[int]:
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
        return ids

    def max_tokens(self, body: CompletionRequest) -> int | None:
        return body.max_tokens

    def response(self, gen: Generation, reason: FinishReason) -> Completion:
        return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
                "choices": [{"index": 0, "text": gen.stream.text, "finish_reason": reason.value, "logprobs": None}],
                "usage": gen.usage()}

    def chunk(self, gen: Generation, delta: str | None, reason: FinishReason | None) -> CompletionChunk:
        return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
                "choices": [{"index": 0, "text": delta or "", "finish_reason": reason.value if reason else None,
                             "logprobs": None}]}
