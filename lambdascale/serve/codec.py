"""A checkpoint's tokenizer (``lambdascale.model.tokenizer.Tokenizer``) seen as a :class:`TextCodec`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TokenizerCodec:
    """Text <-> ids and the chat template for one model; limits come from the model, not the tokenizer."""

    def __init__(self, tokenizer: Any, eos: frozenset[int], context_length: int, vocab_size: int,
                 generation_defaults: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.generation_defaults = dict(generation_defaults or {})

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(ids))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return list(self._tok.encode_chat(messages))
