"""Tokenizer loading, chat templates and incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdascale.errors import CheckpointError, InvalidRequestError
from lambdascale.model.tokenizer import IncrementalDetokenizer, Tokenizer

from .toy_tokenizer import write_toy_tokenizer


def test_multibyte_characters_are_never_split(toy_tokenizer: Tokenizer) -> None:
    text = "héllo wörld ✓ 日本 🙂!"
    ids = toy_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: characters span tokens
    det = IncrementalDetokenizer(toy_tokenizer, context_ids=toy_tokenizer.encode("prompt "))
    deltas = [det.add(t) for t in ids]
    assert "".join(deltas) == text == det.text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") == len(ids) - len(text)  # held while a character was incomplete
    assert det.flush() == ""


def test_flush_releases_an_incomplete_tail(toy_tokenizer: Tokenizer) -> None:
    det = IncrementalDetokenizer(toy_tokenizer)
    assert det.add(ord("a")) == "a"
    assert det.add(0xE2) == ""  # first byte of a 3-byte character, then the stream ends
    assert det.flush() == "\ufffd"


def test_chat_template_and_missing_template(tmp_path: Path, toy_tokenizer: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert toy_tokenizer.apply_chat_template(msgs) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert toy_tokenizer.is_chat
    plain = Tokenizer.from_dir(write_toy_tokenizer(tmp_path / "plain", chat=False))
    assert not plain.is_chat
    with pytest.raises(InvalidRequestError, match="no chat_template"):
        plain.apply_chat_template(msgs)


def test_template_raise_exception_becomes_a_request_error(tmp_path: Path) -> None:
    d = write_toy_tokenizer(tmp_path / "t")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_missing_or_broken_tokenizer_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json does not exist"):
        Tokenizer.from_dir(tmp_path)
    d = write_toy_tokenizer(tmp_path / "b")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"cannot load tokenizer .*tokenizer\.json"):
        Tokenizer.from_dir(d)
