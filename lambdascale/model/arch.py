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
    """Supported architecture families (SmolLM is a Llama; Qwen2.5 is a Qwen2; Phi-4 is a Phi-3).

    The family names where a model came from; what the model *computes* is entirely in the
    feature fields of :class:`ModelArch`, set per family by ``lambdascale.model.families``.
    """

    LLAMA = "llama"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    MISTRAL = "mistral"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3_text"
    PHI3 = "phi3"
    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"


class Activation(str, Enum):
    """The gated MLP's activation: ``down(act(gate(x)) * up(x))`` (SwiGLU or GeGLU)."""

    SILU = "silu"
    GELU_TANH = "gelu_pytorch_tanh"


class LayerKind(str, Enum):
    """What a layer's attention sees: every earlier token, or the last ``sliding_window`` of them."""

    FULL = "full_attention"
    SLIDING = "sliding_attention"


class RouterKind(str, Enum):
    """How a mixture-of-experts layer picks its experts for a token.

    ``softmax_topk``: softmax over all experts' router logits in float32, keep the top k
    (renormalised to sum 1 when ``norm_topk_prob``), as Mixtral, Qwen2-MoE and Qwen3-MoE do.
    """

    SOFTMAX_TOPK = "softmax_topk"


class MoEArch(BaseModel):
    """The mixture-of-experts part of a model: which layers route, over how many experts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0, description="experts each token runs")
    expert_intermediate_size: int = Field(gt=0)
    router: RouterKind = RouterKind.SOFTMAX_TOPK
    norm_topk_prob: bool = Field(default=True, description="renormalise the top-k probabilities to sum 1")
    shared_expert_intermediate_size: int | None = Field(
        default=None, gt=0, description="an always-on expert scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)"
    )
    dense_layers: tuple[int, ...] = Field(default=(), description="layers with a dense MLP of intermediate_size instead")

    @model_validator(mode="after")
    def _check(self) -> "MoEArch":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class ModelArch(BaseModel):
    """Shape and numerics of a decoder-only transformer. Field names follow Hugging Face configs.

    The defaults are Llama's; every other field turns on one feature another family needs.
    """

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
    # ---- features of the other families (defaults: off) ------------------------------------
    hidden_act: Activation = Activation.SILU
    qk_norm: bool = Field(default=False, description="per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)")
    norm_unit_offset: bool = Field(default=False, description="RMSNorm scales by (1 + weight), in float32 (Gemma)")
    sandwich_norms: bool = Field(
        default=False, description="norms after attention and MLP too (pre/post_feedforward_layernorm; Gemma 2/3)"
    )
    scale_embeddings: bool = Field(default=False, description="embeddings times sqrt(hidden_size) (Gemma)")
    query_pre_attn_scalar: float | None = Field(default=None, gt=0, description="attention scale is this ** -0.5")
    attn_logit_softcapping: float | None = Field(default=None, gt=0, description="scores -> c * tanh(scores / c)")
    final_logit_softcapping: float | None = Field(default=None, gt=0, description="logits -> c * tanh(logits / c)")
    sliding_window: int | None = Field(default=None, gt=0, description="a sliding layer sees this many tokens")
    layer_types: tuple[LayerKind, ...] | None = Field(
        default=None, description="per layer; None: every layer sliding when sliding_window is set, else full"
    )
    rope_local_theta: float | None = Field(default=None, gt=0, description="RoPE base of sliding layers (Gemma 3)")
    partial_rotary_factor: float = Field(default=1.0, gt=0, le=1, description="share of head_dim RoPE rotates (Phi-4-mini)")
    moe: MoEArch | None = None

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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            if LayerKind.SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives an odd rotary dimension {self.rotary_dim}")
        if self.moe is not None and any(not 0 <= i < self.num_hidden_layers for i in self.moe.dense_layers):
            raise ValueError(f"moe.dense_layers {list(self.moe.dense_layers)} names layers outside 0..{self.num_hidden_layers - 1}")
        return self

    # ---- per-layer features ---------------------------------------------------------------
    def layer_kind(self, i: int) -> LayerKind:
        """Full or sliding attention for layer ``i``."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return LayerKind.SLIDING if self.sliding_window is not None else LayerKind.FULL

    def window_of(self, i: int) -> int | None:
        """Tokens layer ``i`` attends to (itself included), or None for every earlier token."""
        return self.sliding_window if self.layer_kind(i) is LayerKind.SLIDING else None

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i not in self.moe.dense_layers

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates (the rest pass through)."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.dim_per_head) ** -0.5

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def _attn_params(self) -> int:
        h, d = self.hidden_size, self.dim_per_head
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * d
        return attn + (4 if self.sandwich_norms else 2) * h

    def _mlp_params(self, i: int, active: bool) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(i):
            return 3 * h * self.intermediate_size
        moe = self.moe
        assert moe is not None
        experts = moe.top_k if active else moe.num_experts
        out = h * moe.num_experts + experts * 3 * h * moe.expert_intermediate_size
        if moe.shared_expert_intermediate_size:
            out += 3 * h * moe.shared_expert_intermediate_size + h
        return out

    def layer_params(self, i: int | None = None) -> int:
        """Parameters of decoder layer ``i`` (attention, MLP or all experts, norms); the mean over
        layers when ``i`` is None. These are the bytes a layer moves and stores."""
        if i is None:
            return sum(self.layer_params(j) for j in range(self.num_hidden_layers)) // self.num_hidden_layers
        return self._attn_params() + self._mlp_params(i, active=False)

    def active_layer_params(self, i: int | None = None) -> int:
        """Parameters one token runs through in layer ``i``: an MoE layer counts its router, its
        top-k experts and its shared expert, not the experts it skips (the compute of a step).
        Equal to :meth:`layer_params` for a dense layer; the mean over layers when ``i`` is None."""
        if i is None:
            return sum(self.active_layer_params(j) for j in range(self.num_hidden_layers)) // self.num_hidden_layers
        return self._attn_params() + self._mlp_params(i, active=True)

    def layers_params(self, start: int, end: int) -> int:
        """Total parameters of decoder layers ``[start, end)``."""
        return sum(self.layer_params(i) for i in range(start, end))

    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus LM head (zero extra matrix when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def total_params(self) -> int:
        return self.embed_params() + self.layers_params(0, self.num_hidden_layers) + self.head_params()

    def total_bytes(self, dtype_bytes: int = 2) -> int:
        return self.total_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.dim_per_head * dtype_bytes

    def activation_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of hidden state passed between pipeline stages per token."""
        return self.hidden_size * dtype_bytes

    def with_layers(self, n: int) -> "ModelArch":
        """The same shape with ``n`` decoder layers (shrinks a large shape for benchmarks); a
        layer-type pattern repeats, MoE dense layers past ``n`` drop."""
        update: dict[str, Any] = {"num_hidden_layers": n}
        if self.layer_types is not None:
            update["layer_types"] = tuple(self.layer_types[i % len(self.layer_types)] for i in range(n))
        if self.moe is not None:
            update["moe"] = self.moe.model_copy(update={"dense_layers": tuple(i for i in self.moe.dense_layers if i < n)})
        return ModelArch.model_validate({**self.model_dump(), **update})


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
    # Mixture-of-experts shapes (the simulator charges their compute by active parameters):
    # Mixtral-8x7B (46.7B total, 12.9B active) and Qwen3-30B-A3B (30.5B total, 3.3B active).
    "mixtral-8x7b": ModelArch(family=Family.MIXTRAL, vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                              moe=MoEArch(num_experts=8, top_k=2, expert_intermediate_size=14336),
                              bos_token_id=1, eos_token_id=2),
    "qwen3-30b-a3b": ModelArch(family=Family.QWEN3_MOE, vocab_size=151936, hidden_size=2048,
                               intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                               num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                               rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                               moe=MoEArch(num_experts=128, top_k=8, expert_intermediate_size=768,
                                           norm_topk_prob=True),
                               bos_token_id=151643, eos_token_id=151645),
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
