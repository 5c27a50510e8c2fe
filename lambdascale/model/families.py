"""The one place where model families differ: how each reads its Hugging Face config and where
each keeps its tensors.

Every family maps onto the same :class:`~lambdascale.model.arch.ModelArch`: the model code reads
feature fields (``qk_norm``, ``sandwich_norms``, ``layer_types``, ``moe``, ...), never the family,
so adding a family is a row here. A row (:class:`FamilySpec`) has

* ``features``: the fields fixed for the family (Gemma's (1 + w) norms, Qwen3's q/k norms);
* ``read``: the fields its config decides (sliding layers, experts), beyond the common ones;
* ``tensors``: for a canonical layer tensor (``blockfile.layer_tensor_shapes``), where the HF
  checkpoint keeps it: under the same name, as rows of a fused tensor (Phi-3's ``qkv_proj``), or
  as one tensor per expert to stack (Mixtral's ``experts.{e}.w1``).

Config errors are ``ValueError`` naming the field; the importer prefixes the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lambdascale.model.arch import Activation, Family, LayerKind, ModelArch, MoEArch, RouterKind
from lambdascale.model.rope import SUPPORTED_SCALING


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one canonical tensor from HF tensors: load ``parts`` (several: stack them on
    a new dim 0, one per expert), then keep ``[start, stop)`` along ``dim`` when ``dim`` is set
    (a slice of a fused tensor)."""

    parts: tuple[str, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0


Config = Mapping[str, Any]
LayerTensors = Callable[[ModelArch, int, str], tuple[TensorRecipe, ...]]


def _same(arch: ModelArch, i: int, suffix: str) -> tuple[TensorRecipe, ...]:
    return (TensorRecipe((f"model.layers.{i}.{suffix}",)),)


@dataclass(frozen=True)
class FamilySpec:
    family: Family
    hf_architecture: str
    features: Mapping[str, Any] = field(default_factory=dict)
    read: Callable[[Config], dict[str, Any]] = lambda cfg: {}
    tensors: LayerTensors = _same
    default_eps: float = 1e-6


# ---- config readers ----------------------------------------------------------------------

def _get(cfg: Config, key: str, default: Any = None) -> Any:
    v = cfg.get(key)
    return default if v is None else v


def _rope_params(cfg: Config, layer_type: str | None = None) -> dict[str, Any]:
    """The rope dict: transformers 5's ``rope_parameters`` (per layer type for Gemma 3) or the
    older ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        params = params.get(layer_type or "full_attention") or {}
    out = dict(params) if isinstance(params, dict) else {}
    if cfg.get("rope_scaling"):
        out.update(cfg["rope_scaling"])
    if cfg.get("rope_theta") is not None:
        out["rope_theta"] = cfg["rope_theta"]
    return out


def _rope_scaling(params: dict[str, Any], where: str) -> dict[str, Any] | None:
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in SUPPORTED_SCALING:
        raise ValueError(f"field {where}.rope_type={kind!r} is not supported (supported: {', '.join(SUPPORTED_SCALING)})")
    return scaling


def _activation(cfg: Config) -> Activation:
    key = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
    act = _get(cfg, key, "silu")
    names = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu_pytorch_tanh": Activation.GELU_TANH}
    if act not in names:
        raise ValueError(f"field {key}={act!r} is not supported (supported: {', '.join(sorted(names))})")
    return names[act]


def _layer_types(cfg: Config, n: int, window: int | None, default: Callable[[int], LayerKind]) -> tuple[LayerKind, ...] | None:
    """Per-layer attention kinds: the config's ``layer_types`` or the family's pattern."""
    if window is None:
        return None
    given = cfg.get("layer_types")
    if given is None:
        return tuple(default(i) for i in range(n))
    kinds = {k.value: k for k in LayerKind}
    out = []
    for i, t in enumerate(given):
        if t not in kinds:
            raise ValueError(f"field layer_types[{i}]={t!r} is not supported (supported: {', '.join(kinds)})")
        out.append(kinds[t])
    return tuple(out)


def _all_sliding(i: int) -> LayerKind:
    return LayerKind.SLIDING


def _windowed(cfg: Config) -> dict[str, Any]:
    """Mistral, Mixtral, Phi-3: one sliding window over every layer when the config sets one."""
    window = cfg.get("sliding_window")
    return {"sliding_window": window,
            "layer_types": _layer_types(cfg, cfg["num_hidden_layers"], window, _all_sliding)}


def _qwen_window(cfg: Config) -> dict[str, Any]:
    """Qwen2/3: sliding layers only with ``use_sliding_window``, from ``max_window_layers`` on."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    first = _get(cfg, "max_window_layers", 0)
    return {"sliding_window": window, "layer_types": _layer_types(
        cfg, cfg["num_hidden_layers"], window, lambda i: LayerKind.SLIDING if i >= first else LayerKind.FULL)}


#: Router settings the configs of other MoE families carry; each must have the value we run.
_ROUTER_FIELDS = {"scoring_func": "softmax", "topk_method": "greedy", "router_type": "softmax_topk"}


def _check_router(cfg: Config) -> None:
    for key, ours in _ROUTER_FIELDS.items():
        if key in cfg and cfg[key] not in (None, ours):
            raise ValueError(f"unknown MoE router type: field {key}={cfg[key]!r} (supported: {key}={ours!r}, "
                             f"i.e. router {RouterKind.SOFTMAX_TOPK.value})")
    if cfg.get("n_group") or cfg.get("topk_group"):
        raise ValueError("unknown MoE router type: field n_group/topk_group (grouped top-k routing) is not supported")


def _gemma2(cfg: Config) -> dict[str, Any]:
    window = cfg.get("sliding_window")
    return {"hidden_act": _activation(cfg), "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar"),
            "attn_logit_softcapping": cfg.get("attn_logit_softcapping"),
            "final_logit_softcapping": cfg.get("final_logit_softcapping"), "sliding_window": window,
            "layer_types": _layer_types(cfg, cfg["num_hidden_layers"], window,
                                        lambda i: LayerKind.SLIDING if i % 2 == 0 else LayerKind.FULL)}


def _gemma3(cfg: Config) -> dict[str, Any]:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("field use_bidirectional_attention=true is not supported (a causal decoder only)")
    out = _gemma2(cfg)
    pattern = _get(cfg, "sliding_window_pattern", _get(cfg, "_sliding_window_pattern", 6))
    out["layer_types"] = _layer_types(cfg, cfg["num_hidden_layers"], out["sliding_window"],
                                      lambda i: LayerKind.FULL if (i + 1) % pattern == 0 else LayerKind.SLIDING)
    local = _rope_params(cfg, "sliding_attention")
    if cfg.get("rope_parameters") and "sliding_attention" in cfg["rope_parameters"]:
        if _rope_scaling(local, "rope_parameters.sliding_attention") is not None:
            raise ValueError("field rope_parameters.sliding_attention: scaled RoPE on sliding layers is not supported")
        out["rope_local_theta"] = local.get("rope_theta", 10000.0)
    else:
        out["rope_local_theta"] = _get(cfg, "rope_local_base_freq", 10000.0)
    return out


def _mixtral(cfg: Config) -> dict[str, Any]:
    _check_router(cfg)
    moe = MoEArch(num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                  expert_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    return {**_windowed(cfg), "moe": moe}


def _qwen_moe(cfg: Config) -> dict[str, Any]:
    _check_router(cfg)
    n = cfg["num_hidden_layers"]
    step = _get(cfg, "decoder_sparse_step", 1)
    only = set(_get(cfg, "mlp_only_layers", []))
    dense = tuple(i for i in range(n) if i in only or (i + 1) % step != 0)
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    moe = MoEArch(num_experts=experts, top_k=cfg["num_experts_per_tok"],
                  expert_intermediate_size=cfg["moe_intermediate_size"],
                  norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)),
                  shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or None,
                  dense_layers=dense)
    return {**_qwen_window(cfg), "moe": moe}


# ---- tensor layouts ----------------------------------------------------------------------

def _phi3_tensors(arch: ModelArch, i: int, suffix: str) -> tuple[TensorRecipe, ...]:
    """Phi-3 fuses q/k/v (rows [q | k | v]) and gate/up (rows [gate | up])."""
    p = f"model.layers.{i}."
    q = arch.num_attention_heads * arch.dim_per_head
    kv = arch.num_key_value_heads * arch.dim_per_head
    inter = arch.intermediate_size
    rows = {"self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0, q),
            "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", q, q + kv),
            "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", q + kv, q + 2 * kv),
            "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0, inter),
            "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", inter, 2 * inter)}
    if suffix in rows:
        fused, a, b = rows[suffix]
        return (TensorRecipe((p + fused,), 0, a, b), TensorRecipe((p + suffix,)))
    return _same(arch, i, suffix)


def _expert_tensors(prefix: str, names: Mapping[str, str]) -> LayerTensors:
    """Experts kept one tensor per expert (``{prefix}experts.{e}.{name}.weight``) stacked into
    ``mlp.experts.{gate,up,down}_proj``; transformers 5's fused ``mlp.experts.gate_up_proj``
    [E, 2I, h] and ``down_proj`` are read too. The router is ``{prefix}gate.weight``."""

    def tensors(arch: ModelArch, i: int, suffix: str) -> tuple[TensorRecipe, ...]:
        p = f"model.layers.{i}."
        moe = arch.moe
        if moe is None or not suffix.startswith("mlp.") or not arch.is_moe_layer(i):
            return _same(arch, i, suffix)
        inter = moe.expert_intermediate_size
        if suffix == "mlp.gate.weight":
            return (TensorRecipe((p + prefix + "gate.weight",)),)
        if suffix.startswith("mlp.experts."):
            which = suffix.rsplit(".", 1)[1]  # gate_proj | up_proj | down_proj
            per_expert = TensorRecipe(tuple(f"{p}{prefix}experts.{e}.{names[which]}.weight" for e in range(moe.num_experts)))
            fused = {"gate_proj": TensorRecipe((p + "mlp.experts.gate_up_proj",), 1, 0, inter),
                     "up_proj": TensorRecipe((p + "mlp.experts.gate_up_proj",), 1, inter, 2 * inter),
                     "down_proj": TensorRecipe((p + "mlp.experts.down_proj",))}[which]
            return (per_expert, fused)
        return _same(arch, i, suffix)

    return tensors


_QWEN_EXPERTS = _expert_tensors("mlp.", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})

#: Gemma's norms, GeGLU, embedding scale: shared by Gemma 2 and 3.
_GEMMA = {"norm_unit_offset": True, "sandwich_norms": True, "scale_embeddings": True, "tie_word_embeddings": True}

#: One row per Hugging Face ``model_type``.
FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(Family.LLAMA, "LlamaForCausalLM", default_eps=1e-5),
    "qwen2": FamilySpec(Family.QWEN2, "Qwen2ForCausalLM", {"attention_bias": True}, _qwen_window),
    "qwen3": FamilySpec(Family.QWEN3, "Qwen3ForCausalLM", {"qk_norm": True}, _qwen_window),
    "mistral": FamilySpec(Family.MISTRAL, "MistralForCausalLM", {}, _windowed, default_eps=1e-5),
    "gemma2": FamilySpec(Family.GEMMA2, "Gemma2ForCausalLM", _GEMMA, _gemma2),
    "gemma3_text": FamilySpec(Family.GEMMA3, "Gemma3ForCausalLM", {**_GEMMA, "qk_norm": True}, _gemma3),
    "phi3": FamilySpec(Family.PHI3, "Phi3ForCausalLM", {}, _windowed, _phi3_tensors, default_eps=1e-5),
    "mixtral": FamilySpec(Family.MIXTRAL, "MixtralForCausalLM", {}, _mixtral,
                          _expert_tensors("block_sparse_moe.", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
                          default_eps=1e-5),
    "qwen2_moe": FamilySpec(Family.QWEN2_MOE, "Qwen2MoeForCausalLM", {}, _qwen_moe, _QWEN_EXPERTS),
    "qwen3_moe": FamilySpec(Family.QWEN3_MOE, "Qwen3MoeForCausalLM", {"qk_norm": True}, _qwen_moe, _QWEN_EXPERTS),
}

#: Config fields that turn on something we do not run, and the values (besides absent/null) we run.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"mlp_bias": (False,), "use_qk_norm": (False,), "attention_chunk_size": (),
                                            "clip_qkv": ()}

_HINTS = {"gemma3": "the multimodal Gemma 3; import its text model (model_type gemma3_text) instead"}


def spec_for(model_type: Any) -> FamilySpec:
    if model_type not in FAMILIES:
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise ValueError(f"unsupported architecture model_type={model_type!r}{hint}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def arch_from_hf_config(cfg: Config) -> ModelArch:
    """A :class:`ModelArch` from a Hugging Face ``config.json`` dict.

    Raises ``ValueError`` naming the field for an unsupported family or feature, ``KeyError``
    for a missing required field.
    """
    spec = spec_for(cfg.get("model_type"))
    for key, ok in _UNSUPPORTED.items():
        if cfg.get(key) is not None and cfg[key] not in ok:
            raise ValueError(f"field {key}={cfg[key]!r} is not supported by lambdascale's {spec.family.value} model")
    rope = _rope_params(cfg)
    kwargs: dict[str, Any] = {
        "family": spec.family,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "head_dim": cfg.get("head_dim"),
        "max_position_embeddings": _get(cfg, "max_position_embeddings", 4096),
        "rms_norm_eps": _get(cfg, "rms_norm_eps", spec.default_eps),
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": _rope_scaling(rope, "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"),
        "partial_rotary_factor": _get(cfg, "partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "hidden_act": _activation(cfg),
        **spec.features,
    }
    if "attention_bias" in cfg or "qkv_bias" in cfg:
        kwargs["attention_bias"] = bool(cfg.get("attention_bias", cfg.get("qkv_bias")))
    elif spec.family is Family.QWEN2_MOE:
        kwargs["attention_bias"] = True  # Qwen1.5-MoE configs predate the field; their q/k/v have biases
    if "tie_word_embeddings" in cfg:
        kwargs["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"])
    kwargs.update({k: v for k, v in spec.read(cfg).items() if v is not None})
    return ModelArch(**kwargs)


def hf_config(arch: ModelArch) -> dict[str, Any]:
    """A Hugging Face style config dict for ``arch`` (reference checks with transformers; the
    dense families without the newer features)."""
    spec = next(s for s in FAMILIES.values() if s.family is arch.family)
    out: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": arch.family.value,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": dict(arch.rope_scaling) if arch.rope_scaling else None,  # a copy: transformers edits it
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": arch.hidden_act.value,
        "sliding_window": arch.sliding_window,
    }
    if arch.head_dim is not None:
        out["head_dim"] = arch.head_dim
    if arch.family is Family.LLAMA:
        out["attention_bias"] = arch.attention_bias
    if arch.bos_token_id is not None:
        out["bos_token_id"] = arch.bos_token_id
    if arch.eos_token_id is not None:
        out["eos_token_id"] = arch.eos_token_id
    return out


def layer_recipes(arch: ModelArch, i: int, suffix: str) -> tuple[TensorRecipe, ...]:
    """Where a HF checkpoint of ``arch``'s family keeps layer ``i``'s canonical tensor ``suffix``
    (alternatives, most usual first)."""
    return spec_for(arch.family.value).tensors(arch, i, suffix)
