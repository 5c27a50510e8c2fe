"""Continuous batching, sampling, stops, streaming, abort and resumption on tiny models."""

from __future__ import annotations

import pytest

from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import FinishReason, RequestOutput
from lambdascale.errors import InvalidRequestError

from .hf_ref import hf_greedy, hf_model

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _text(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)


@pytest.mark.parametrize("shape", ["tiny-llama3", "tiny-qwen2"])
def test_engine_greedy_matches_transformers(make_engine, shape: str) -> None:
    _arch, model, _sd = hf_model(shape)
    prompt = [1, 33, 64, 5, 77, 120]
    eng = make_engine(shape)
    outs = list(eng.generate(prompt, GREEDY))
    assert _tokens(outs) == hf_greedy(model, prompt, 10)
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    assert [o.finished for o in outs[:-1]] == [False] * 9  # streamed one token at a time


def test_concurrent_requests_match_solo_runs(make_engine) -> None:
    prompts = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [5], [200, 100, 50, 25]]
    params = [GREEDY, SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.2, top_k=20, seed=5, ignore_eos=True), GREEDY]
    solo = []
    for p, sp in zip(prompts, params):
        solo.append(_tokens(list(make_engine().generate(p, sp))))
    eng = make_engine(max_batch_size=3, max_num_batched_tokens=6)  # forces queueing and chunking
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    seen_batch = 0
    got: dict[str, list[int]] = {r: [] for r in rids}
    while eng.has_unfinished:
        outs = eng.step()
        seen_batch = max(seen_batch, eng.num_running + sum(o.finished for o in outs))
        assert eng.num_running <= 3
        for o in outs:
            got[o.request_id].extend(o.token_ids)
    assert [got[r] for r in rids] == solo
    assert seen_batch == 3  # requests really ran together
    assert eng.runner.cached_sequences() == 0  # every KV slot released


def test_seeded_sampling_reproducible_and_seed_dependent(make_engine) -> None:
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    a = _tokens(list(make_engine().generate([1, 2, 3], sp)))
    b = _tokens(list(make_engine().generate([1, 2, 3], sp)))
    c = _tokens(list(make_engine().generate([1, 2, 3], SamplingParams(**{**sp.__dict__, "seed": 43}))))
    assert a == b and a != c


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resume_from_token_state_reproduces_the_uninterrupted_stream(make_engine, toy_tokenizer, cut: int) -> None:
    sp = SamplingParams(max_tokens=14, temperature=0.8, top_p=0.95, seed=11, stop=("zz",), ignore_eos=True)
    full = list(make_engine().generate("hi there", sp))
    first = make_engine()
    stream = first.generate("hi there", sp)
    head = [next(stream) for _ in range(cut)]
    state = head[-1].token_state
    stream.close()  # the original instance drops the request (abort frees its cache)
    assert first.runner.cached_sequences() == 0
    second = make_engine(max_batch_size=2)
    # the destination is busy with other work that outlives the moved request
    other = second.add_request([9, 9, 9], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    tail = list(second.stream(second.resume(state)))
    assert _tokens(head) + _tokens(tail) == _tokens(full)
    assert _text(head) + _text(tail) == _text(full)
    assert tail[-1].finish_reason == full[-1].finish_reason
    assert second._seqs[other].output_ids  # the other request ran alongside and is still going


def test_stop_token_ids_and_eos(make_engine) -> None:
    free = _tokens(list(make_engine().generate([1, 2, 3], GREEDY)))
    stop_at = free[4]
    outs = list(make_engine().generate([1, 2, 3], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])))
    first = free.index(stop_at)
    assert _tokens(outs) == free[: first + 1]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop_at
    assert outs[-1].text == ""  # the stop token's text is not emitted


def test_stop_strings_never_leak(make_engine, toy_tokenizer) -> None:
    sp = SamplingParams(max_tokens=30, temperature=1.0, seed=2, ignore_eos=True)
    free = list(make_engine().generate("ab", sp))
    text = _text(free)
    assert len(text) > 12
    stop = text[6:9]  # a 3-character string the free run produces
    outs = list(make_engine().generate("ab", SamplingParams(**{**sp.__dict__, "stop": (stop, "\x00never")})))
    got = _text(outs)
    assert got == text[: text.find(stop)]
    assert stop not in got and outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop
    # no delta ever showed characters beyond the final text (held back while ambiguous)
    acc = ""
    for o in outs:
        acc += o.text
        assert got.startswith(acc)


def test_max_tokens_and_context_limit(make_engine) -> None:
    outs = list(make_engine().generate([1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert len(_tokens(outs)) == 3 and outs[-1].finish_reason is FinishReason.LENGTH
    eng = make_engine(max_model_len=20)
    outs = list(eng.generate(list(range(1, 16)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    assert len(_tokens(outs)) == 5 and outs[-1].finish_reason is FinishReason.LENGTH  # 15 + 5 = 20


def test_prompt_longer_than_context_is_rejected(make_engine) -> None:
    eng = make_engine(max_model_len=32)
    with pytest.raises(InvalidRequestError, match="context limit of 32 tokens"):
        eng.add_request(list(range(1, 40)), GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary of 256"):
        eng.add_request([1, 999], GREEDY)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        make_engine(tokenizer=False).add_request("text", GREEDY)
    assert not eng.has_unfinished


def test_abort_frees_the_kv_cache(make_engine) -> None:
    eng = make_engine()
    a = eng.add_request([1, 2, 3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    b = eng.add_request([4, 5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.runner.cached_sequences() == 2
    out = eng.abort(a)
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert eng.runner.cached_sequences() == 1 and eng.abort(a) is None
    rest = eng.run_to_completion([b])[b]
    assert rest[-1].finished and eng.runner.cached_sequences() == 0 and not eng.has_unfinished


def test_chat_messages_use_the_template(make_engine, toy_tokenizer) -> None:
    eng = make_engine()
    ids = eng.encode_prompt(messages=[{"role": "user", "content": "hey"}])
    assert toy_tokenizer.decode(ids) == "<|user|>hey\n<|assistant|>"


def test_engine_over_a_three_stage_pipeline_matches_the_full_model(make_engine) -> None:
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.settings import EngineSettings
    from lambdascale.engine.stage import split_stages
    from lambdascale.model.arch import plan_blocks

    arch, _model, sd = hf_model("tiny-llama")
    stages = split_stages(arch, sd, plan_blocks(arch.num_hidden_layers, 3), max_len=128, max_seqs=4)
    piped = Engine(arch, stages, None, EngineSettings(device="cpu", max_batch_size=4))
    sp = SamplingParams(max_tokens=8, temperature=0.9, seed=21, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [50, 60], [7] * 9]
    rids = [piped.add_request(p, sp) for p in prompts]
    res = piped.run_to_completion(rids)
    want = [_tokens(list(make_engine().generate(p, sp))) for p in prompts]
    assert [_tokens(res[r]) for r in rids] == want
    assert all(len(st.kv) == 0 for st in stages)  # every stage released every sequence
