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
