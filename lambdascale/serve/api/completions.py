"""``POST /v1/completions``: a text prompt, a list of one string, or token ids."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from fastapi.responses import Response

from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.api.generation import Entry, Generation, GenerationHandler
from lambdascale.serve.api.logprobs import completion_logprobs
from lambdascale.serve.backend import FinishReason, TextCodec
from lambdascale.serve.schemas import Completion, CompletionChunk, CompletionLogprobs, CompletionRequest, Usage


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

    def best_of(self, body: CompletionRequest) -> int:
        return body.best_of or body.n

    @staticmethod
    def _echoed(body: CompletionRequest, gen: Generation) -> str:
        """The prompt's text as ``echo`` returns it (a text prompt as sent; token ids decoded)."""
        if not body.echo:
            return ""
        if isinstance(body.prompt, str):
            return body.prompt
        if body.prompt and isinstance(body.prompt[0], str):
            return body.prompt[0]  # type: ignore[return-value]
        return gen._codec.decode(gen.request.prompt_ids)

    def response(self, body: CompletionRequest, gens: Sequence[Generation], usage: Usage) -> Completion:
        g0 = gens[0]
        return {"id": g0.response_id, "object": "text_completion", "created": g0.created, "model": g0.model,
                "choices": [{"index": i, "text": self._echoed(body, g) + g.stream.text,
                             "finish_reason": (g.reason or FinishReason.LENGTH).value,
                             "logprobs": self._logprobs(body, g) if body.logprobs is not None else None}
                            for i, g in enumerate(gens)],
                "usage": usage}

    @staticmethod
    def _logprobs(body: CompletionRequest, g: Generation) -> CompletionLogprobs:
        if not body.echo:
            return completion_logprobs(g._codec, g.entries)
        return completion_logprobs(g._codec, g.entries, prompt=g.request.prompt_ids, prompt_lps=g.prompt_logprobs)

    def chunk(self, gen: Generation, index: int, delta: str | None, reason: FinishReason | None,
              entry: Entry | None) -> CompletionChunk:
        return {"id": gen.response_id, "object": "text_completion", "created": gen.created, "model": gen.model,
                "choices": [{"index": index, "text": delta or "", "finish_reason": reason.value if reason else None,
                             "logprobs": completion_logprobs(gen._codec, [entry]) if entry is not None else None}]}

    def opening_chunks(self, body: CompletionRequest, gens: Sequence[Generation]) -> list[CompletionChunk]:
        """With ``echo``, each choice's stream starts with the prompt's text."""
        if not body.echo:
            return []
        chunks = [self.chunk(g, i, self._echoed(body, g), None, None) for i, g in enumerate(gens)]
        if body.logprobs is not None:  # the prompt's tokens, with their logprobs, come with its text
            for c, g in zip(chunks, gens):
                c["choices"][0]["logprobs"] = completion_logprobs(g._codec, (), prompt=g.request.prompt_ids,
                                                                  prompt_lps=g.prompt_logprobs)
        return chunks
