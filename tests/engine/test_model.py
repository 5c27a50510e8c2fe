"""Our Llama-family model against transformers on the same weights, and stage splits."""

from __future__ import annotations

import pytest
import torch

from lambdascale.model.families import hf_config
from lambdascale.engine.stage import SeqSlice, Stage, StageBatch, full_stage, split_stages
from lambdascale.errors import CheckpointError, InvalidRequestError
from lambdascale.model.arch import SHAPES, plan_blocks
from lambdascale.model.llama import StageModel
from lambdascale.model.rope import compute_inv_freq

from .hf_ref import FAMILIES, hf_greedy, hf_model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _greedy(stages: list[Stage], prompt: list[int], n: int, seq_id: str = "s") -> list[int]:
    """Greedy decode through a pipeline of stages, hidden states handed from one to the next."""
    out: list[int] = []
    tokens = prompt
    start = 0
    for _ in range(n):
        batch = StageBatch((SeqSlice(seq_id, start, len(tokens)),))
        x: torch.Tensor = torch.tensor(tokens, dtype=torch.int64)
        for st in stages:
            x = st.forward(batch, x)
        nxt = int(x[0].argmax())
        out.append(nxt)
        start += len(tokens)
        tokens = [nxt]
    return out


@pytest.mark.parametrize("shape", FAMILIES)
def test_logits_match_transformers(shape: str) -> None:
    arch, model, sd = hf_model(shape)
    stage = full_stage(arch, sd, max_len=128, max_seqs=2)
    ids = torch.randint(0, arch.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    ours = stage.forward(StageBatch((SeqSlice("a", 0, 24),)), ids, all_logits=True)
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    assert ours.shape == ref.shape == (24, arch.vocab_size)
    assert _rel_err(ours, ref) < 1e-4
    # decode steps against the cache agree with the reference's full recompute as well
    nxt = torch.tensor([7], dtype=torch.int64)
    step = stage.forward(StageBatch((SeqSlice("a", 24, 1),)), nxt)
    with torch.no_grad():
        ref2 = model(torch.cat([ids, nxt])[None]).logits[0, -1]
    assert _rel_err(step[0], ref2) < 1e-4


@pytest.mark.parametrize("shape", FAMILIES)
def test_greedy_matches_transformers_generate(shape: str) -> None:
    arch, model, sd = hf_model(shape)
    prompt = [1, 17, 42, 99, 3, 250, 8]
    ref = hf_greedy(model, prompt, 12)
    ours = _greedy([full_stage(arch, sd, max_len=128, max_seqs=1)], prompt, 12)
    assert ours == ref
    assert len(set(ref)) > 1  # weights produce a non-trivial continuation


def test_three_stage_split_gives_the_same_tokens() -> None:
    arch, _model, sd = hf_model("tiny-llama")
    ranges = plan_blocks(arch.num_hidden_layers, 3)  # [(0,3), (3,6), (6,8)]
    stages = split_stages(arch, sd, ranges, max_len=128, max_seqs=2)
    assert [s.first for s in stages] == [True, False, False]
    assert [s.last for s in stages] == [False, False, True]
    assert [s.model.num_layers for s in stages] == [3, 3, 2]
    prompt = [1, 5, 9, 200, 31]
    whole = _greedy([full_stage(arch, sd, max_len=128, max_seqs=2)], prompt, 10)
    assert _greedy(stages, prompt, 10) == whole
    # each stage cached only its own layers' K/V for the sequence
    assert all(st.cached_len("s") == len(prompt) + 9 for st in stages)
    assert [len(st.kv.buffers()) for st in stages] == [3, 3, 2]


def test_batched_decode_and_mixed_prefill_match_single_runs() -> None:
    """A step mixing decodes of several sequences with a prefill equals running each alone."""
    arch, _model, sd = hf_model("tiny-qwen2")
    solo = {}
    prompts = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7], "c": [100, 101, 102, 103, 104, 105, 106]}
    for sid, p in prompts.items():
        st = full_stage(arch, sd, max_len=64, max_seqs=1)
        st.forward(StageBatch((SeqSlice(sid, 0, len(p)),)), torch.tensor(p))
        solo[sid] = st.forward(StageBatch((SeqSlice(sid, len(p), 1),)), torch.tensor([11]))[0]
    st = full_stage(arch, sd, max_len=64, max_seqs=4)
    a, b, c = prompts["a"], prompts["b"], prompts["c"]
    st.forward(StageBatch((SeqSlice("a", 0, 5), SeqSlice("b", 0, 3))), torch.tensor(a + b))
    out = st.forward(
        StageBatch((SeqSlice("a", 5, 1), SeqSlice("b", 3, 1), SeqSlice("c", 0, 7))),
        torch.tensor([11, 11] + c),
    )
    assert _rel_err(out[0], solo["a"]) < 1e-5 and _rel_err(out[1], solo["b"]) < 1e-5
    out_c = st.forward(StageBatch((SeqSlice("c", 7, 1),)), torch.tensor([11]))
    assert _rel_err(out_c[0], solo["c"]) < 1e-5
    # freeing a slot and reusing it does not leak the old sequence's cache
    assert st.release("a") and not st.release("a")
    st.forward(StageBatch((SeqSlice("d", 0, 3),)), torch.tensor(b))
    out_d = st.forward(StageBatch((SeqSlice("d", 3, 1),)), torch.tensor([11]))
    assert _rel_err(out_d[0], solo["b"]) < 1e-5


def test_resumed_prefill_from_offset_matches() -> None:
    """A prefill continuing an existing cache (start > 0) equals one prefill of everything."""
    arch, _model, sd = hf_model("tiny-mistral")
    ids = list(range(3, 23))
    one = full_stage(arch, sd, max_len=64, max_seqs=1)
    ref = one.forward(StageBatch((SeqSlice("x", 0, 20),)), torch.tensor(ids), all_logits=True)
    two = full_stage(arch, sd, max_len=64, max_seqs=1)
    two.forward(StageBatch((SeqSlice("x", 0, 12),)), torch.tensor(ids[:12]))
    tail = two.forward(StageBatch((SeqSlice("x", 12, 8),)), torch.tensor(ids[12:]), all_logits=True)
    assert _rel_err(tail, ref[12:]) < 1e-5


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 128},
    ],
)
def test_rope_scaling_matches_transformers(scaling: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = SHAPES["tiny-llama"].model_copy(update={"rope_scaling": scaling})
    cfg = LlamaConfig(**hf_config(arch))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    inv, scale = compute_inv_freq(arch)
    assert torch.allclose(inv, ref_inv.float(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale)
    # and it is not the unscaled table (the test would notice a silently ignored scaling)
    if scaling["rope_type"] != "dynamic":
        assert not torch.allclose(inv, compute_inv_freq(SHAPES["tiny-llama"])[0])


def test_unknown_rope_scaling_is_rejected() -> None:
    arch = SHAPES["tiny-llama"].model_copy(update={"rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(InvalidRequestError, match="longrope"):
        compute_inv_freq(arch)


def test_bad_state_dict_names_the_tensor() -> None:
    arch, _model, sd = hf_model("tiny-llama")
    broken = dict(sd)
    del broken["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        StageModel.from_tensors(arch, broken, source="block_000.safetensors")
    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(3,\)"):
        StageModel.from_tensors(arch, bad)
    # a middle stage needs neither embedding nor head
    mid = {k: v for k, v in sd.items() if k.startswith("model.layers.3.")}
    st = StageModel.from_tensors(arch, mid, layers=(3, 4))
    assert not st.first and not st.last and st.num_layers == 1


def test_context_limit_is_enforced_by_the_stage() -> None:
    arch, _model, sd = hf_model("tiny-llama")
    st = full_stage(arch, sd, max_len=16, max_seqs=1)
    with pytest.raises(InvalidRequestError, match="context limit of 16"):
        st.forward(StageBatch((SeqSlice("x", 0, 17),)), torch.arange(17))
    assert "x" not in st.kv  # nothing allocated by a rejected step
    with pytest.raises(ValueError, match="rows"):  # bad input inside the model: slot given back
        st.forward(StageBatch((SeqSlice("y", 0, 4),)), torch.arange(3))
    assert "y" not in st.kv and len(st.kv) == 0


def test_bfloat16_runs_close_to_float32() -> None:
    arch, _model, sd = hf_model("tiny-llama")
    ids = torch.arange(1, 20)
    f32 = full_stage(arch, sd, max_len=64, max_seqs=1).forward(StageBatch((SeqSlice("a", 0, 19),)), ids, True)
    bf = full_stage(arch, sd, max_len=64, max_seqs=1, dtype=torch.bfloat16)
    assert bf.model.dtype == torch.bfloat16 and bf.kv.dtype == torch.bfloat16
    out = bf.forward(StageBatch((SeqSlice("a", 0, 19),)), ids, True)
    assert out.dtype == torch.float32
    assert _rel_err(out, f32) < 0.1


def test_kv_moves_between_stages() -> None:
    """A pipeline stage's K/V handed to a full-model stage continues the sequence identically."""
    arch, _model, sd = hf_model("tiny-llama")
    prompt = [4, 8, 15, 16, 23, 42]
    a = split_stages(arch, sd, [(0, 4), (4, 8)], max_len=64, max_seqs=2)
    x: torch.Tensor = torch.tensor(prompt)
    for st in a:
        x = st.forward(StageBatch((SeqSlice("m", 0, 6),)), x)
    dest = full_stage(arch, sd, max_len=64, max_seqs=2)
    dest.import_kv("m", a[0].export_kv("m") + a[1].export_kv("m"))
    assert dest.cached_len("m") == 6
    got = dest.forward(StageBatch((SeqSlice("m", 6, 1),)), torch.tensor([9]))
    ref = full_stage(arch, sd, max_len=64, max_seqs=1)
    ref.forward(StageBatch((SeqSlice("m", 0, 6),)), torch.tensor(prompt))
    want = ref.forward(StageBatch((SeqSlice("m", 6, 1),)), torch.tensor([9]))
    assert _rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="expected"):
        dest.import_kv("n", [(t[0][:1], t[1]) for t in a[0].export_kv("m") + a[1].export_kv("m")])
