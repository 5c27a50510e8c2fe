"""Import a local Hugging Face model directory (every family in ``lambdascale.model.families``).

Reads ``config.json``, the ``*.safetensors`` weights (single file or sharded with
``model.safetensors.index.json``) lazily tensor by tensor, and the tokenizer files. Each
canonical tensor is built by its family's recipe (renamed, sliced out of a fused tensor, or
stacked from one tensor per expert). FP8 (e4m3) weights with a ``weight_scale`` (one per tensor
or one per output channel) are dequantized to bfloat16 on the CPU (:mod:`.fp8`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from lambdascale.errors import CheckpointError
from lambdascale.model.arch import ModelArch
from lambdascale.model.blockfile import block_tensor_shapes
from lambdascale.model.checkpoint import BlockSource
from lambdascale.model.families import TensorRecipe, arch_from_hf_config, layer_recipes
from lambdascale.model.importers.fp8 import FP8_DTYPES, check_fp8_config, dequantize_fp8
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
            self.arch: ModelArch = arch_from_hf_config(self.config)
            self.fp8 = check_fp8_config(self.config.get("quantization_config"))
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        except KeyError as e:
            raise CheckpointError(f"{cfg_path}: missing field {e}") from None
        self.weight_map = self._weight_map()
        self._fused: tuple[str, Any] = ("", None)  # the fused tensor last sliced (Phi-3's qkv_proj)
        self.source_dtypes = self._source_dtypes()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index: {e}") from None
            out = {k: self.path / v for k, v in wm.items()}
            missing = sorted({p for p in out.values() if not p.is_file()})
            if missing:
                first = next(k for k, p in out.items() if p == missing[0])
                raise CheckpointError(
                    f"{index}: weight_map names shard {missing[0].name} (for {first} and others), which is missing "
                    f"from {self.path}" + (f"; {len(missing)} shards missing" if len(missing) > 1 else "")
                )
            return out
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors weight files")
        out = {}
        for f, keys in self._headers(files).items():
            for k in keys:
                out[k] = f
        return out

    @staticmethod
    def _headers(files: list[Path]) -> dict[Path, dict[str, Any]]:
        """Each file's safetensors header entries (name -> {dtype, shape, ...})."""
        out: dict[Path, dict[str, Any]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if n <= 0 or n > 100 << 20:
                        raise ValueError(f"header length {n}")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors header: {e}") from None
            header.pop("__metadata__", None)
            out[f] = header
        return out

    def _source_dtypes(self) -> dict[str, str]:
        """The stored dtype of every tensor (safetensors codes: BF16, F8_E4M3, ...)."""
        out: dict[str, str] = {}
        for header in self._headers(sorted(set(self.weight_map.values()))).values():
            out.update({k: str(v.get("dtype")) for k, v in header.items()})
        return out

    @property
    def dtype(self) -> DType:
        if self.fp8:
            return DType.BFLOAT16
        d = self.config.get("torch_dtype") or self.config.get("dtype")
        return DType(d) if d in ("bfloat16", "float16") else DType.FLOAT32

    def _load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.weight_map.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the weights")
        try:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
                if t.dtype in FP8_DTYPES:
                    scale_name = name.removesuffix(".weight") + ".weight_scale" if name.endswith(".weight") else name + "_scale"
                    scale = self._load(scale_name) if scale_name in self.weight_map else None
                    t = dequantize_fp8(t, scale, f"{f}: {name}")
                return t
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name}: {e}") from None

    def _build(self, name: str, recipes: tuple[TensorRecipe, ...]) -> torch.Tensor:
        for r in recipes:
            if all(p in self.weight_map for p in r.parts):
                if r.dim is not None and len(r.parts) == 1:  # a slice of a fused tensor: read it once
                    if self._fused[0] != r.parts[0]:
                        self._fused = (r.parts[0], self._load(r.parts[0]))
                    parts = [self._fused[1]]
                else:
                    parts = [self._load(p) for p in r.parts]
                t = torch.stack(parts) if len(parts) > 1 else parts[0]
                return t.narrow(r.dim, r.start, r.stop - r.start).contiguous() if r.dim is not None else t
        looked = " or ".join(", ".join(r.parts[:2]) + (", ..." if len(r.parts) > 2 else "") for r in recipes)
        raise CheckpointError(f"{self.path}: tensor {name} is missing from the weights (looked for {looked})")

    def tensor(self, name: str) -> torch.Tensor:
        """Canonical tensor ``name`` built from the checkpoint by the family's recipe."""
        if name == "lm_head.weight" and name not in self.weight_map and self.arch.tie_word_embeddings:
            return self._load("model.embed_tokens.weight")
        if name.startswith("model.layers."):
            i_str, suffix = name[len("model.layers."):].split(".", 1)
            return self._build(name, layer_recipes(self.arch, int(i_str), suffix))
        return self._load(name)

    def block_source(self, n_blocks: int) -> BlockSource:
        def source(b: int, layers: tuple[int, int]) -> Mapping[str, torch.Tensor]:
            return {name: self.tensor(name) for name in block_tensor_shapes(self.arch, layers, b == 0, b == n_blocks - 1)}

        return source

    def tensor_source_dtype(self, name: str) -> str | None:
        """The stored dtype a canonical tensor was converted from (its first part's)."""
        if name.startswith("model.layers."):
            i_str, suffix = name[len("model.layers."):].split(".", 1)
            for r in layer_recipes(self.arch, int(i_str), suffix):
                if all(p in self.weight_map for p in r.parts):
                    return self.source_dtypes.get(r.parts[0])
            return None
        if name == "lm_head.weight" and name not in self.weight_map:
            name = "model.embed_tokens.weight"
        return self.source_dtypes.get(name)

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
