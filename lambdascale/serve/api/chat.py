"""``POST /v1/chat/completions``: messages rendered by the model's chat template."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from fastapi.responses import Response

from lambdascale.serve.api.generation import Entry, Generation, GenerationHandler
from lambdascale.serve.api.logprobs import chat_logprobs
from lambdascale.serve.backend import FinishReason, TextCodec
from lambdascale.serve.schemas import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, Usage


class ChatHandler(GenerationHandler[ChatCompletionRequest]):
    endpoint = "chat"
    id_prefix = "chatcmpl-"
    prompt_param = "messages"
    chunk_object = "chat.completion.chunk"

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self.handle(body, request)

    def prompt_ids(self, body: ChatCompletionRequest, codec: TextCodec) -> list[int]:
        # "developer" is OpenAI's newer name for "system"; templates know only the latter.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        return codec.apply_chat_template(messages)

    def max_tokens(self, body: ChatCompletionRequest) -> int | None:
        return body.effective_max_tokens()

    def response(self, body: ChatCompletionRequest, gens: Sequence[Generation], usage: Usage) -> ChatCompletion:
        g0 = gens[0]
        return {"id": g0.response_id, "object": "chat.completion",
                "created": g0.created, "model": g0.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": g.stream.text},
                             "finish_reason": (g.reason or FinishReason.LENGTH).value,
                             "logprobs": chat_logprobs(g._codec, g.entries) if body.logprobs else None}
                            for i, g in enumerate(gens)],
                "usage": usage}

    def chunk(self, gen: Generation, index: int, delta: str | None, reason: FinishReason | None,
              entry: Entry | None, role: bool = False) -> ChatCompletionChunk:
        d: ChatDelta = {}
        if role:
            d["role"] = "assistant"
        if delta:
            d["content"] = delta
        return {"id": gen.response_id, "object": "chat.completion.chunk", "created": gen.created,
                "model": gen.model,
                "choices": [{"index": index, "delta": d, "finish_reason": reason.value if reason else None,
                             "logprobs": chat_logprobs(gen._codec, [entry]) if entry is not None else None}]}

    def opening_chunks(self, body: ChatCompletionRequest, gens: Sequence[Generation]) -> list[ChatCompletionChunk]:
        return [self.chunk(g, i, None, None, None, role=True) for i, g in enumerate(gens)]
