"""A byte-level tokenizer with exactly 256 tokens (id = byte value) for the tiny test models."""

from __future__ import annotations

import json
from pathlib import Path


def byte_to_char() -> dict[int, str]:
    """GPT-2 style reversible map of bytes to printable characters (built here, not copied)."""
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_toy_tokenizer(d: Path, chat: bool = True) -> Path:
    """Write tokenizer.json + tokenizer_config.json into ``d`` (a byte-level BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2c = byte_to_char()
    vocab = {b2c[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": None}
    if chat:
        cfg["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d
