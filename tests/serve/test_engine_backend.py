"""The gateway over the real in-process engine with the demo model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.engine_backend import EngineBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

DEMO = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine_server(demo_model_dir: Path) -> Iterator[tuple[ServerThread, EngineBackend]]:
    cfg = load_config(None, {"engine.max_batch_size": 4, "engine.threads": 1, "engine.max_model_len": 512})
    backend = EngineBackend(cfg, demo_model_dir)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=DEMO))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start()
    try:
        yield server, backend
    finally:
        server.stop()


def test_real_model_answers_through_the_openai_sdk(engine_server) -> None:
    server, _ = engine_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=DEMO, messages=QUESTION, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn (EOS), which is not in the text
    assert "<|im_end|>" not in text
    stream = client.chat.completions.create(model=DEMO, messages=QUESTION, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    # Seeded sampling through the gateway is reproducible.
    a, b = (client.completions.create(model=DEMO, prompt="Once upon a time", max_tokens=8, seed=7).choices[0].text
            for _ in range(2))
    assert a == b
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=DEMO, prompt="hi", max_tokens=600)


def test_demo_answers_by_default_with_its_recorded_generation_defaults(engine_server, demo_model_dir: Path) -> None:
    """Issue 19: without ``temperature`` a request sampled at 1.0 and the answer was noise. The demo's
    import records its generation defaults in the manifest and unset fields take them."""
    from lambdascale.model.checkpoint import find_model

    gen = find_model(demo_model_dir, DEMO).manifest.generation
    assert gen is not None and gen.temperature == 0.0 and "general.sampling" in gen.source
    server, _ = engine_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    for _ in range(2):  # unseeded: each request draws its own seed, and the default still answers
        r = client.chat.completions.create(model=DEMO, messages=QUESTION, max_tokens=24)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_logprobs_and_n_on_the_real_model_through_the_sdk(engine_server) -> None:
    """Raw model logprobs: a greedy token is its own top alternative; n seeded choices are independent
    and reproducible; penalties and logit_bias reach the engine's sampler."""
    server, _ = engine_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=DEMO, messages=QUESTION, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    kw = dict(model=DEMO, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices] and len(set(texts)) > 1
    greedy = client.completions.create(model=DEMO, prompt="The sky is", max_tokens=6, temperature=0).choices[0].text
    first = client.tokenize if hasattr(client, "tokenize") else None  # the SDK has no tokenize: use httpx
    assert first is None
    ids = httpx.post(server.url + "/tokenize", json={"model": DEMO, "prompt": greedy}, timeout=30).json()["tokens"]
    banned = client.completions.create(model=DEMO, prompt="The sky is", max_tokens=6, temperature=0,
                                       logit_bias={str(ids[0]): -100}).choices[0].text
    assert banned != greedy and not banned.startswith(greedy[:2].strip() or "\0")
    penalised = client.completions.create(model=DEMO, prompt="The sky is", max_tokens=6, temperature=0,
                                          extra_body={"repetition_penalty": 1.9, "frequency_penalty": 2.0}).choices[0].text
    assert penalised != greedy


def test_gateway_matches_the_engine_called_in_process(engine_server, demo_model_dir: Path) -> None:
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.checkpoint import find_model

    server, _ = engine_server
    engine = Engine.from_checkpoint(find_model(demo_model_dir, DEMO), load_config(None, {"engine.threads": 1}).engine)
    outs = list(engine.generate("The sky is", SamplingParams(max_tokens=10, temperature=0)))
    want = "".join(o.text for o in outs)
    got = httpx.post(server.url + "/v1/completions", json={"model": DEMO, "prompt": "The sky is", "max_tokens": 10,
                                                           "temperature": 0}, timeout=60).json()
    assert got["choices"][0]["text"] == want
    assert got["usage"]["completion_tokens"] == len(outs)


def test_disconnect_frees_the_engines_slot(engine_server) -> None:
    server, backend = engine_server
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions",
                      json={"model": DEMO, "prompt": "Count to one thousand:", "max_tokens": 400,
                            "ignore_eos": True, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
            t0 = time.monotonic()  # the worker thread publishes its counts after each step
            while time.monotonic() - t0 < 2.0 and backend.capacity(DEMO).running != 1:
                time.sleep(0.01)
            assert backend.capacity(DEMO).running == 1
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and backend.capacity(DEMO).running:
        time.sleep(0.01)
    assert backend.capacity(DEMO).running == 0
    engine = backend._workers[DEMO].engine
    assert not engine.has_unfinished  # aborted in the engine: its KV cache slot was released
    assert not backend._workers[DEMO].queues
