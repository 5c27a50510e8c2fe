"""Every family against transformers: a tiny random-weight model built with transformers' own
config and model classes, saved, imported with `lambdascale import`, then its logits (float32)
and 32 greedy tokens past a sliding window of 8, through the checkpoint's two blocks as a
two-stage pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lambdascale.cli import main
from lambdascale.engine.stage import SeqSlice, Stage, StageBatch, stage_from_checkpoint
from lambdascale.model.arch import Activation, Family, LayerKind
from lambdascale.model.checkpoint import find_model
from lambdascale.model.importers.tokenizer import synthetic_tokenizer_files

COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
WINDOW = 8


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        # Qwen2.5: q/k/v bias, tied embeddings, sliding layers from layer 2 on
        "qwen2.5": lambda: tf.Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                          sliding_window=WINDOW, max_window_layers=2),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=24),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                          attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
        # Phi-4-mini's partial rotary (0.75 of each head) and Phi-3's fused qkv / gate_up
        "phi3": lambda: tf.Phi3Config(**COMMON, sliding_window=WINDOW,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.75}),
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
        "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1]),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                               shared_expert_intermediate_size=80, norm_topk_prob=False),
    }


FAMILY_CASES = list(_configs())


def build_hf_dir(d: Path, case: str, seed: int = 0) -> Any:
    """Save a widened random-weight transformers model of ``case`` to ``d``; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _configs()[case]()
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        # std-0.02 init gives nearly flat logits; widen so greedy choices and expert routing are
        # well separated and an implementation error shows as another token
        # (Gemma multiplies embeddings by sqrt(hidden): theirs start smaller, or the tied head
        # would echo the input token)
        embed_std = 0.5 / COMMON["hidden_size"] ** 0.5 if case.startswith("gemma") else 0.5
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, embed_std if "embed" in name else 0.15)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                else:  # norms: ones (Llama) or zeros (Gemma's 1 + w), perturbed
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(d)
    for name, data in synthetic_tokenizer_files(256, 1, 2, 256).items():
        (d / name).write_bytes(data)
    return model


def _greedy(stages: list[Stage], prompt: list[int], n: int) -> list[int]:
    out, tokens, start = [], prompt, 0
    for _ in range(n):
        x: torch.Tensor = torch.tensor(tokens, dtype=torch.int64)
        for st in stages:
            x = st.forward(StageBatch((SeqSlice("s", start, len(tokens)),)), x)
        out.append(int(x[0].argmax()))
        start += len(tokens)
        tokens = [out[-1]]
    return out


def _hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _import(src: Path, models: Path) -> Any:
    assert main(["import", str(src), "--models-dir", str(models), "--blocks", "2", "--quiet"]) == 0
    return find_model(models, src.name)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_matches_transformers(tmp_path: Path, case: str) -> None:
    src = tmp_path / case
    model = build_hf_dir(src, case)
    ck = _import(src, tmp_path / "models")
    arch = ck.arch
    assert ck.manifest.n_blocks == 2
    ids = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(1))
    full = stage_from_checkpoint(ck, range(2), max_len=128, max_seqs=1)
    ours = full.forward(StageBatch((SeqSlice("a", 0, 20),)), ids, all_logits=True)
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
    # 32 greedy tokens from a 12-token prompt: well past the window of 8 for every sliding layer,
    # through the two blocks as a pipeline of stages (each block runs alone, experts included)
    prompt = ids[:12].tolist()
    stages = [stage_from_checkpoint(ck, range(b, b + 1), max_len=128, max_seqs=1) for b in range(2)]
    want = _hf_greedy(model, prompt, 32)
    assert _greedy(stages, prompt, 32) == want
    assert len(set(want)) > 3  # a non-trivial continuation
    if arch.sliding_window is not None:
        assert arch.sliding_window == WINDOW and LayerKind.SLIDING in [arch.layer_kind(i) for i in range(4)]


def test_family_features_are_read_from_the_config(tmp_path: Path) -> None:
    """What each family's config turns on, as the model code reads it (a wrong table row shows)."""
    got = {}
    for case in ("gemma2", "gemma3", "phi3", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2.5"):
        d = tmp_path / case
        d.mkdir()
        cfg = _configs()[case]()
        (d / "config.json").write_text(cfg.to_json_string())
        from lambdascale.model.families import arch_from_hf_config

        got[case] = arch_from_hf_config(json.loads((d / "config.json").read_text()))
    g2, g3 = got["gemma2"], got["gemma3"]
    assert g2.family is Family.GEMMA2 and g2.hidden_act is Activation.GELU_TANH and g2.norm_unit_offset
    assert g2.attn_logit_softcapping == 5.0 and g2.final_logit_softcapping == 30.0 and g2.attn_scale == 24 ** -0.5
    assert [g2.layer_kind(i) for i in range(4)] == [LayerKind.SLIDING, LayerKind.FULL] * 2
    assert g3.qk_norm and g3.rope_local_theta == 10000.0 and g3.rope_theta == 1e6
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert got["phi3"].rotary_dim == 12 and got["phi3"].window_of(0) == WINDOW
    q3 = got["qwen3_moe"]
    assert q3.moe is not None and q3.moe.dense_layers == (1,) and not q3.is_moe_layer(1) and q3.is_moe_layer(2)
    assert got["qwen2_moe"].moe is not None and got["qwen2_moe"].moe.shared_expert_intermediate_size == 80
    assert got["qwen2_moe"].attention_bias and not got["qwen2_moe"].moe.norm_topk_prob
    assert got["mixtral"].moe is not None and got["mixtral"].moe.norm_topk_prob
    assert [got["qwen2.5"].window_of(i) for i in range(4)] == [None, None, WINDOW, WINDOW]


# ---- bad input: each error names the file and the field ------------------------------------

def _config_dir(tmp_path: Path, case: str, **edit: Any) -> Path:
    d = tmp_path / case
    build_hf_dir(d, case)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_unsupported_feature_and_unknown_router_name_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lambdascale.errors import CheckpointError
    from lambdascale.model.importers import import_model

    d = _config_dir(tmp_path, "mistral", mlp_bias=True)
    with pytest.raises(CheckpointError, match=r"mistral/config\.json: field mlp_bias=True is not supported"):
        import_model(str(d), tmp_path / "models")
    d = _config_dir(tmp_path, "mixtral", scoring_func="sigmoid")
    with pytest.raises(CheckpointError, match=r"mixtral/config\.json: unknown MoE router type: field scoring_func='sigmoid'"):
        import_model(str(d), tmp_path / "models")
    d = _config_dir(tmp_path, "gemma3", hidden_activation="relu")
    with pytest.raises(CheckpointError, match=r"gemma3/config\.json: field hidden_activation='relu' is not supported"):
        import_model(str(d), tmp_path / "models")
    # the CLI says it in one line, exit status 2, nothing imported
    assert main(["import", str(d), "--models-dir", str(tmp_path / "models"), "--quiet"]) == 2
    assert "hidden_activation='relu'" in capsys.readouterr().err
    assert not (tmp_path / "models" / "gemma3").exists()


def test_manifest_with_an_unknown_router_names_the_field(tmp_path: Path) -> None:
    from lambdascale.errors import CheckpointError
    from lambdascale.model.manifest import read_manifest

    build_hf_dir(tmp_path / "qwen3_moe", "qwen3_moe")
    ck = _import(tmp_path / "qwen3_moe", tmp_path / "models")
    m = json.loads((ck.dir / "manifest.json").read_text())
    m["arch"]["moe"]["router"] = "sigmoid_group_topk"
    (ck.dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest\.json: invalid manifest:\n  arch\.moe\.router: "):
        read_manifest(ck.dir)


def test_missing_shard_names_the_index_and_the_shard(tmp_path: Path) -> None:
    from lambdascale.errors import CheckpointError
    from lambdascale.model.importers import import_model

    d = tmp_path / "sharded"
    model = build_hf_dir(tmp_path / "src", "qwen3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(d, max_shard_size="100KB")
    for f in (tmp_path / "src").glob("tokenizer*"):
        (d / f.name).write_bytes(f.read_bytes())
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"sharded/model\.safetensors\.index\.json: weight_map names shard {shards[1].name}"):
        import_model(str(d), tmp_path / "models")
