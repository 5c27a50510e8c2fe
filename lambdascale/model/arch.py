"""Model architecture description and the registry of known shapes.

``ModelArch`` is the one description of a Llama-family model's shape that every part of the
system shares: the engine builds modules from it, the checkpoint manifest stores it, the store
and the simulator size transfers and memory from it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Family(str, Enum):
    """Supported architecture families (SmolLM is a Llama)."""

    LLAMA = "llama"
    QWEN2 = "qwen2"
    MISTRAL = "mistral"


class ModelArch(BaseModel):
    """Shape and numerics of a Llama-family decoder. Field names follow Hugging Face configs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Family = Family.LLAMA
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int | None = Field(default=None, description="defaults to hidden_size / heads")
    max_position_embeddings: int = Field(default=4096, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = Field(
        default=None, description="HF rope_scaling dict (llama3, linear, dynamic, yarn) or None"
    )
    tie_word_embeddings: bool = False
    attention_bias: bool = Field(default=False, description="q/k/v projections carry a bias (Qwen2)")
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelArch":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set head_dim"
            )
        return self

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two norms)."""
        h, d = self.hidden_size, self.dim_per_head
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus LM head (zero extra matrix when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def total_params(self) -> int:
        return self.embed_params() + self.num_hidden_layers * self.layer_params() + self.head_params()

    def total_bytes(self, dtype_bytes: int = 2) -> int:
        return self.total_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.dim_per_head * dtype_bytes

    def activation_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of hidden state passed between pipeline stages per token."""
        return self.hidden_size * dtype_bytes

    def with_layers(self, n: int) -> "ModelArch":
        """The same shape with ``n`` decoder layers (shrinks a large shape for benchmarks)."""
        return self.model_copy(update={"num_hidden_layers": n})

    # ---- Hugging Face config round trip ---------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        """Build from a Hugging Face ``config.json`` dict; raises ValueError on unsupported models."""
        model_type = cfg.get("model_type")
        families = {"llama": Family.LLAMA, "qwen2": Family.QWEN2, "mistral": Family.MISTRAL}
        if model_type not in families:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r}; supported: {sorted(families)}"
            )
        family = families[model_type]
        kwargs: dict[str, Any] = {
            "family": family,
            "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["intermediate_size"],
            "num_hidden_layers": cfg["num_hidden_layers"],
            "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            "head_dim": cfg.get("head_dim"),
            "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
            "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6 if family is Family.QWEN2 else 1e-5),
            "rope_theta": cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            "rope_scaling": cfg.get("rope_scaling"),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "attention_bias": bool(cfg.get("attention_bias", family is Family.QWEN2)),
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": cfg.get("eos_token_id"),
        }
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face style config dict (used for reference checks with transformers)."""
        arch_name = {
            Family.LLAMA: "LlamaForCausalLM",
            Family.QWEN2: "Qwen2ForCausalLM",
            Family.MISTRAL: "MistralForCausalLM",
        }[self.family]
        out: dict[str, Any] = {
            "architectures": [arch_name],
            "model_type": self.family.value,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.family is Family.LLAMA:
            out["attention_bias"] = self.attention_bias
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out


def plan_blocks(num_layers: int, n_blocks: int) -> list[tuple[int, int]]:
    """Cut ``num_layers`` decoder layers into ``n_blocks`` contiguous [start, end) ranges.

    Sizes differ by at most one layer; earlier blocks get the extra layers. Block 0 also holds
    the embedding and the last block the final norm and LM head (see the checkpoint format).
    """
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be positive, got {n_blocks}")
    if n_blocks > num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {n_blocks} blocks")
    base, extra = divmod(num_layers, n_blocks)
    out: list[tuple[int, int]] = []
    start = 0
    for b in range(n_blocks):
        size = base + (1 if b < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _llama(**kw: Any) -> ModelArch:
    return ModelArch(family=Family.LLAMA, **kw)


#: Registered shapes: synthetic (random-weight) models of these shapes serve benchmarks and the
#: simulator. ``tiny-*`` shapes are for tests.
SHAPES: dict[str, ModelArch] = {
    "llama2-7b": _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "llama2-13b": _llama(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                         num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "llama2-70b": _llama(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "llama3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=8192, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           max_position_embeddings=8192, rope_theta=100000.0,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # Qwen2-0.5B's shape: about 1 GB in bfloat16, the "1 GB model" of the scale-out benchmarks.
    "qwen2-0.5b": ModelArch(family=Family.QWEN2, vocab_size=151936, hidden_size=896,
                            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, max_position_embeddings=32768,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                            tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "tiny-llama": _llama(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
    "tiny-llama3": _llama(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 128},
                          bos_token_id=1, eos_token_id=2),
    "tiny-qwen2": ModelArch(family=Family.QWEN2, vocab_size=256, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-mistral": ModelArch(family=Family.MISTRAL, vocab_size=256, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512,
                              bos_token_id=1, eos_token_id=2),
}


def get_shape(name: str) -> ModelArch:
    """Look up a registered shape; the error lists the known names."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}") from None


def synthetic_arch(shape: str, layers: int | None = None) -> ModelArch:
    """The shape named ``shape`` (``synthetic:`` prefix allowed), cut to ``layers`` decoder layers.

    Raises ``ModelNotFoundError`` for an unknown shape (the message lists the known ones) and
    ``CheckpointError`` for ``layers < 1``: what ``lambdascale import synthetic:SHAPE`` checks
    before it writes anything.
    """
    from lambdascale.errors import CheckpointError, ModelNotFoundError

    name = shape.split(":", 1)[1] if shape.startswith("synthetic:") else shape
    try:
        arch = get_shape(name)
    except ValueError as e:
        raise ModelNotFoundError(str(e)) from None
    if layers is None:
        return arch
    if layers < 1:
        raise CheckpointError(f"--layers must be at least 1, got {layers}")
    return arch.with_layers(layers)
