"""``POST /v1/chat/completions``: messages rendered by the model's chat template."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from lambdascale.serve.api.generation import Generation, GenerationHandler
from lambdascale.serve.backend import FinishReason, TextCodec
from lambdascale.serve.schemas import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta


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

    def response(self, gen: Generation, reason: FinishReason) -> ChatCompletion:
        return {"id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.stream.text},
                             "finish_reason": reason.value, "logprobs": None}],
                "usage": gen.usage()}

    def chunk(self, gen: Generation, delta: str | None, reason: FinishReason | None,
              role: bool = False) -> ChatCompletionChunk:
        d: ChatDelta = {}
        if role:
            d["role"] = "assistant"
        if delta:
            d["content"] = delta
        return {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created, "model": gen.model,
                "choices": [{"index": 0, "delta": d, "finish_reason": reason.value if reason else None,
                             "logprobs": None}]}

    def opening_chunks(self, gen: Generation) -> list[ChatCompletionChunk]:
        return [self.chunk(gen, None, None, role=True)]
