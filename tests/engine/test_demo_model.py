"""The demo model (SmolLM2-135M-Instruct imported into our format): answers, and agrees with transformers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lambdascale.model.families import hf_config
from lambdascale.cli import main
from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.settings import EngineSettings
from lambdascale.engine.stage import SeqSlice, StageBatch
from lambdascale.model.checkpoint import find_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_ckpt(demo_model_dir: Path):
    return find_model(demo_model_dir, "smollm2-135m")


@pytest.fixture(scope="module")
def demo_engine(demo_ckpt) -> Engine:
    return Engine.from_checkpoint(demo_ckpt, EngineSettings(device="cpu", dtype="float32", threads=1))


def test_demo_answers_paris(demo_engine: Engine) -> None:
    outs = list(demo_engine.generate(messages=QUESTION, params=SamplingParams(max_tokens=24, temperature=0)))
    text = "".join(o.text for o in outs)
    assert "Paris" in text
    assert outs[-1].finish_reason.value == "stop"  # it ends with <|im_end|>, which is not shown
    assert "<|im_end|>" not in text


def test_demo_matches_transformers(demo_engine: Engine, demo_ckpt) -> None:
    """Our imported weights in transformers' Llama: same logits (1e-4) at every step, same greedy tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = demo_ckpt.arch
    tensors: dict[str, torch.Tensor] = {}
    for b in range(demo_ckpt.manifest.n_blocks):
        tensors.update(demo_ckpt.block_tensors(b, dtype=torch.float32))
    cfg = AutoConfig.for_model(**hf_config(arch))
    with warnings.catch_warnings(), torch.device("meta"):  # no random init of 135M weights
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=cfg)  # its buffer was on meta
    ref.tie_weights()
    ref.eval()
    prompt = demo_engine.encode_prompt(messages=QUESTION)
    n = 6
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    want = gen.sequences[0, len(prompt):].tolist()
    theirs = torch.cat(gen.logits)  # [n, vocab]: prefill's last position, then each decode step
    # our model, step by step through the stage API (prefill, then decodes against the KV cache)
    stage = demo_engine.runner.stages[0]
    logits, toks, start, step_ids = [], [], 0, prompt
    for _ in range(n):
        out = stage.forward(StageBatch((SeqSlice("cmp", start, len(step_ids)),)), torch.tensor(step_ids))
        logits.append(out[0])
        toks.append(int(out[0].argmax()))
        start += len(step_ids)
        step_ids = [toks[-1]]
    stage.release("cmp")
    ours = torch.stack(logits)
    assert toks == want
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4
    assert "Paris" in demo_engine.tokenizer.decode(want)


def test_generate_cli_streams_the_answer(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "smollm2-135m", "What is the capital of France?", "--models-dir", str(demo_model_dir),
               "--max-tokens", "24", "--quiet", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_cli_unknown_model_lists_what_exists(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "no-such-model", "hi", "--models-dir", str(demo_model_dir), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m" in err


def test_generate_cli_imports_the_demo_model_on_first_use(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty models directory: ``generate smollm2-135m`` calls the importer for it, once."""
    import lambdascale.model.importers as importers

    calls: list[tuple[str, Path]] = []

    def fake_import(spec: str, models_dir: Path, **kw):  # the real import is tested by the store's tests
        calls.append((spec, Path(models_dir)))
        return find_model(demo_model_dir, "smollm2-135m")

    monkeypatch.setattr(importers, "import_model", fake_import)
    empty = tmp_path / "models"
    rc = main(["generate", "smollm2-135m", "What is the capital of France?", "--models-dir", str(empty),
               "--max-tokens", "12", "--threads", "1", "--device", "cpu"])
    assert rc == 0 and calls == [("smollm2-135m", empty)]
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "importing smollm2-135m" in captured.err
