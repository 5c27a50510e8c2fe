"""Token logprobs in OpenAI's two shapes: chat's ``logprobs.content`` and the legacy completions object.

Each visible token of a choice (hidden stop tokens excluded) carries the model's raw logprob of it
and its top alternatives (``engine.sampling.TokenLogprobs``). A token's text is the codec's decode
of that one id, as vLLM shows it; ``bytes`` are that text's UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdascale.engine.sampling import TokenLogprobs
from lambdascale.serve.backend import TextCodec
from lambdascale.serve.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs


def _text(codec: TextCodec, token: int) -> str:
    return codec.decode([token])


def chat_logprobs(codec: TextCodec, entries: Sequence[tuple[int, TokenLogprobs]]) -> ChatLogprobs:
    content: list[ChatTokenLogprob] = []
    for tok, lp in entries:
        text = _text(codec, tok)
        content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _text(codec, i)), "logprob": p, "bytes": list(t.encode())}
                                         for i, p in lp.top]})
    return {"content": content, "refusal": None}


def completion_logprobs(codec: TextCodec, entries: Sequence[tuple[int, TokenLogprobs]],
                        offset: int = 0, prompt: Sequence[int] = (),
                        prompt_lps: Sequence[TokenLogprobs] = ()) -> CompletionLogprobs:
    """The legacy object; ``text_offset`` counts characters from ``offset`` (where the choice's
    text, or this chunk's, starts). Two alternatives that decode to the same text keep the likelier.
    With ``echo``, the ``prompt`` ids come first: the first with null logprobs (nothing predicts it),
    the others with ``prompt_lps`` (positions 1..)."""
    out: CompletionLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    if prompt:
        lead: list[tuple[int, TokenLogprobs | None]] = [(prompt[0], None), *zip(prompt[1:], prompt_lps)]
        for tok, plp in lead:
            text = _text(codec, tok)
            out["tokens"].append(text)
            out["token_logprobs"].append(plp.logprob if plp is not None else None)
            ptop: dict[str, float] = {}
            for i, p in (plp.top if plp is not None else ()):
                ptop.setdefault(_text(codec, i), p)
            out["top_logprobs"].append(ptop if plp is not None else None)
            out["text_offset"].append(pos)
            pos += len(text)
    for tok, lp in entries:
        text = _text(codec, tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        top: dict[str, float] = {}
        for i, p in lp.top:
            top.setdefault(_text(codec, i), p)
        out["top_logprobs"].append(top)
        out["text_offset"].append(pos)
        pos += len(text)
    return out
