"""Building ``tokenizer/`` files: from GGUF metadata, and a byte-level one for synthetic models.

The engine loads ``tokenizer/tokenizer.json`` with the ``tokenizers`` library and reads
``tokenizer_config.json`` for the chat template and special tokens, the way transformers does,
so every model in our format carries both files.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

#: GGUF ``tokenizer.ggml.token_type`` value of control (special) tokens.
_GGUF_CONTROL = 3


def _byte_alphabet() -> set[str]:
    return set(pre_tokenizers.ByteLevel.alphabet())


def byte_level_bpe_files(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None,
    bos_id: int | None,
    eos_id: int | None,
    unk_id: int | None,
    pad_id: int | None,
    chat_template: str | None,
    split_digits: bool,
    model_max_length: int,
) -> dict[str, bytes]:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` for a GPT-2 style BPE.

    ``tokens`` are spelled in the byte-level alphabet, as GGUF (``tokenizer.ggml.model = gpt2``)
    stores them. ``split_digits`` splits every digit alone before byte-level splitting, as
    SmolLM2's own tokenizer and llama.cpp's ``smollm`` pre-tokenizer do.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs: list[tuple[str, str]] = []
    for m in merges:
        a, _, b = m.partition(" ")
        merge_pairs.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = _byte_alphabet()
    specials = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, token_types or ())
        if ty == _GGUF_CONTROL and set(t) <= alphabet
    ]
    if specials:
        tok.add_special_tokens(specials)

    def name(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special_map = {k: v for k, v in {
        "bos_token": name(bos_id), "eos_token": name(eos_id),
        "unk_token": name(unk_id), "pad_token": name(pad_id),
    }.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **special_map,
        "additional_special_tokens": [t.content for t in specials],
    }
    if chat_template:
        config["chat_template"] = chat_template
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=1).encode(),
        "special_tokens_map.json": json.dumps(special_map, indent=1).encode(),
    }


#: A minimal ChatML template for synthetic models (their weights are random; the template only
#: lets chat requests run through the same code path).
SYNTHETIC_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def synthetic_tokenizer_files(vocab_size: int, bos_id: int | None, eos_id: int | None, model_max_length: int) -> dict[str, bytes]:
    """A byte-level tokenizer filling ``vocab_size`` ids for a random-weight model.

    Ids 0..2 are ``<unk>``, ``<s>``, ``</s>``; the 256 byte symbols follow while they fit (tiny
    shapes of vocab 256 lose the last three, which then encode as ``<unk>``); larger vocabularies
    are padded with ``<extra_i>`` tokens so every id the model can emit decodes.
    """
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = sorted(_byte_alphabet())
    tokens = specials + alphabet
    tokens = tokens[:vocab_size]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types = [_GGUF_CONTROL] * 3 + [1] * (vocab_size - 3)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    special_map = {"unk_token": "<unk>", "bos_token": tokens[bos_id] if bos_id is not None else "<s>",
                   "eos_token": tokens[eos_id] if eos_id is not None else "</s>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        **special_map, "chat_template": SYNTHETIC_CHAT_TEMPLATE,
    }
    del types
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=1).encode(),
        "special_tokens_map.json": json.dumps(special_map, indent=1).encode(),
    }
