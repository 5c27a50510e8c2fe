"""A model's own generation defaults, read at import time and recorded in its manifest.

The rule (the gateway applies it, ``serve/api/generation.py``): a request's sampling field that
the client leaves unset takes the model's default from here when the checkpoint carries one, else
OpenAI's default (temperature 1, top_p 1, no top-k, no penalty). This is what vLLM does with
``--generation-config auto``. Sources, read once by the importer:

* a Hugging Face directory: ``generation_config.json``'s ``temperature``, ``top_p``, ``top_k``,
  ``repetition_penalty`` and ``max_new_tokens`` (the keys vLLM reads; ``do_sample`` is not read,
  as vLLM does not), and its ``eos_token_id`` (one id or a list: chat models list their
  end-of-turn token there, e.g. Llama 3's ``<|eot_id|>``), which end generation like EOS;
* a GGUF file: ``general.sampling.temp``, ``.top_k``, ``.top_p``, ``.penalty_repeat``, and
  ``tokenizer.ggml.eot_token_id`` / ``eom_token_id`` as extra end ids.

``min_p`` and the other keys have no counterpart in our sampler and are not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambdascale.errors import CheckpointError

#: the sampling fields a model's defaults may set (request field names)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")


class GenerationDefaults(BaseModel):
    """What a checkpoint says about how to sample from it (unset = it says nothing)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0 = off")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, description="Hugging Face's max_new_tokens")
    eos_token_ids: list[int] = Field(default_factory=list, description="extra ids that end generation")
    source: str = Field(default="", description="where these came from")

    def sampling(self) -> dict[str, Any]:
        """The sampling defaults that are set, by request field name."""
        out = {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) is not None}
        if out.get("top_k") == 0:
            out["top_k"] = -1  # both mean "off"; the request schema's spelling is -1
        return out


def _validated(values: dict[str, Any], where: str) -> GenerationDefaults:
    try:
        return GenerationDefaults(**values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise CheckpointError(f"{where}: generation default {loc}: {err['msg']} (got {err.get('input')!r})") from None


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def from_hf_generation_config(path: Path) -> GenerationDefaults:
    """Defaults from a Hugging Face ``generation_config.json`` (an empty record when it is absent)."""
    if not path.is_file():
        return GenerationDefaults(source=f"{path.name} absent")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    values: dict[str, Any] = {k: cfg[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in cfg}
    if "max_new_tokens" in cfg:
        values["max_tokens"] = cfg["max_new_tokens"]
    try:
        values["eos_token_ids"] = _ids(cfg.get("eos_token_id"))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: eos_token_id must be an integer or a list of integers, got {cfg.get('eos_token_id')!r}") from None
    return _validated(values, str(path))


#: GGUF metadata key -> our field
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}


def from_gguf_fields(field: Callable[[str], Any], where: str) -> GenerationDefaults:
    """Defaults from GGUF metadata; ``field(key)`` returns a key's value or None."""
    values: dict[str, Any] = {ours: field(k) for k, ours in _GGUF_KEYS.items() if field(k) is not None}
    values["eos_token_ids"] = [int(t) for t in (field("tokenizer.ggml.eot_token_id"), field("tokenizer.ggml.eom_token_id"))
                               if t is not None]
    found = sorted(k for k in _GGUF_KEYS if field(k) is not None)
    return _validated({**values, "source": f"gguf {', '.join(found) or 'without general.sampling.* keys'}"}, where)
