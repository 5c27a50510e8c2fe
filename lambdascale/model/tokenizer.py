"""Tokenizer of a checkpoint: ``tokenizer/tokenizer.json`` plus ``tokenizer_config.json``.

Encoding and decoding use the ``tokenizers`` library; the chat template is rendered with jinja2
in a sandbox (as Hugging Face does) with ``bos_token``/``eos_token`` and ``raise_exception``.
:class:`IncrementalDetokenizer` turns a growing list of token ids into text deltas without ever
emitting half a multi-byte character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from lambdascale.errors import CheckpointError, InvalidRequestError

_REPLACEMENT = "\ufffd"


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and special tokens."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], source: str = "tokenizer") -> None:
        self._tok = tokenizer
        self.config = config
        self.source = source
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template: Any = None  # compiled jinja2 template, built on first use

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory with ``tokenizer.json`` (required) and ``tokenizer_config.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"missing tokenizer: {tj} does not exist")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"cannot load tokenizer {tj}: {e}") from e
        cfg: dict[str, Any] = {}
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"tokenizer config {tc} is not valid JSON: {e}") from e
            if not isinstance(cfg, dict):
                raise CheckpointError(f"tokenizer config {tc} must hold a JSON object")
        return cls(tok, cfg, source=str(d))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def is_chat(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; adds BOS when the config asks and the tokenizer did not."""
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the chat template (``InvalidRequestError`` if the model has none)."""
        if not self.chat_template:
            raise InvalidRequestError(f"model tokenizer {self.source} has no chat_template")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str) -> None:
                raise TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise InvalidRequestError(f"chat template of {self.source} rejected the messages: {e}") from e

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the rendered chat prompt (the template carries its own special tokens)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas for a growing output, robust to multi-byte characters split over tokens.

    It decodes a short window ``ids[prefix:]`` and compares with ``ids[prefix:read]``; the
    difference is new text. While the window ends in an incomplete UTF-8 sequence (decoded as
    U+FFFD) nothing is emitted, so the stream never shows a broken character. A few context
    tokens before the window keep tokenizers that drop leading spaces (SentencePiece) right.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        ctx = list(context_ids)[-4:]
        self.ids: list[int] = ctx
        self.prefix = 0
        self.read = len(ctx)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if after.endswith(_REPLACEMENT) or len(after) < len(before):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (an incomplete character shows as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        delta = after[len(before):] if after.startswith(before) else after
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
