"""Import a local Hugging Face model directory (Llama, Qwen2, Mistral, SmolLM).

Reads ``config.json``, the ``*.safetensors`` weights (single file or sharded with
``model.safetensors.index.json``) lazily tensor by tensor, and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch
from lambdascale.model.blockfile import block_tensor_shapes
from lambdascale.model.checkpoint import BlockSource
from lambdascale.model.manifest import DType

#: Tokenizer files copied into ``tokenizer/`` when present (tokenizer.json is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class HFDirSource:
    """A Hugging Face directory opened for import."""

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (not a Hugging Face model directory)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
        try:
            self.arch = ModelArch.from_hf_config(self.config)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        except KeyError as e:
            raise CheckpointError(f"{cfg_path}: missing field {e}") from None
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index: {e}") from None
            return {k: self.path / v for k, v in wm.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors weight files")
        from safetensors import safe_open

        out: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        out[k] = f
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot read safetensors header: {e}") from None
        return out

    @property
    def dtype(self) -> DType:
        d = self.config.get("torch_dtype") or self.config.get("dtype")
        return DType(d) if d in ("bfloat16", "float16") else DType.FLOAT32

    def block_source(self, n_blocks: int) -> BlockSource:
        from safetensors import safe_open

        def load(name: str) -> torch.Tensor:
            f = self.weight_map.get(name)
            if f is None:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the weights")
            try:
                with safe_open(str(f), framework="pt") as h:
                    return h.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {name}: {e}") from None

        def source(b: int, layers: tuple[int, int]) -> Mapping[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for name in block_tensor_shapes(self.arch, layers, b == 0, b == n_blocks - 1):
                if name == "lm_head.weight" and name not in self.weight_map and self.arch.tie_word_embeddings:
                    out[name] = load("model.embed_tokens.weight")
                else:
                    out[name] = load(name)
            return out

        return source

    def tokenizer_files(self) -> dict[str, bytes]:
        tj = self.path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"missing tokenizer: {tj} does not exist (a fast tokenizer.json is required)")
        out = {n: (self.path / n).read_bytes() for n in TOKENIZER_FILES if (self.path / n).is_file()}
        cfg = json.loads(out.get("tokenizer_config.json", b"{}"))
        jinja = self.path / "chat_template.jinja"
        if "chat_template" not in cfg and jinja.is_file():
            cfg["chat_template"] = jinja.read_text()
        out["tokenizer_config.json"] = json.dumps(cfg, indent=1).encode()
        return out
