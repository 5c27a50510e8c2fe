"""The request fields of issue 19 through the gateway over the fake backend: the model's generation
defaults for unset fields, n / best_of / echo / min_tokens, /tokenize and /detokenize."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from lambdascale.serve.fake import FakeBackend, FakeCodec, fake_token

from .conftest import MODEL


def _text(prompt: str, n: int, temperature: float, seed: int | None) -> str:
    ids = FakeCodec().encode(prompt)
    return bytes(fake_token(ids, i, temperature, seed) for i in range(n)).decode()


def test_unset_fields_take_the_models_generation_defaults(make_app) -> None:
    """The fake's tokens depend on the seed only when temperature > 0: a model default of 0 makes an
    unset temperature greedy; a request's own value still wins."""
    be = FakeBackend()
    app, _ = make_app(backend=be)
    with TestClient(app) as c:
        def text(**kw: object) -> str:
            return c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "seed": 9, **kw}).json()["choices"][0]["text"]

        assert text(max_tokens=4) == _text("hi", 4, 1.0, 9)  # no model default: OpenAI's temperature 1
        be._codec.generation_defaults = {"temperature": 0.0, "max_tokens": 3}
        assert text() == _text("hi", 3, 0.0, None)  # greedy, and the model's max_new_tokens
        assert text(max_tokens=4, temperature=0.7) == _text("hi", 4, 0.7, 9)


def test_echo_n_best_of_and_min_tokens(make_app) -> None:
    be = FakeBackend()
    app, _ = make_app(backend=be)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 3, "temperature": 0,
                                            "echo": True}).json()
        assert r["choices"][0]["text"] == "hey" + _text("hey", 3, 0.0, None)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 3, "temperature": 0,
                                            "echo": True, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "hey" + _text("hey", 3, 0.0, None)
        # best_of 4, n 2: two of the four seeded choices, counted in usage
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 3, "temperature": 1.0,
                                            "seed": 1, "n": 2, "best_of": 4}).json()
        assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] == 12
        assert all(ch["logprobs"] is None for ch in r["choices"])  # asked for none: the ranking's are not shown
        four = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 3, "temperature": 1.0,
                                               "seed": 1, "n": 4}).json()
        assert {ch["text"] for ch in r["choices"]} <= {ch["text"] for ch in four["choices"]}
        # a stop string inside the first min_tokens tokens does not end the answer (vLLM's rule)
        want = _text("hey", 8, 0.0, None)
        stop = want[1]
        cut = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 8, "temperature": 0,
                                              "stop": [stop]}).json()["choices"][0]["text"]
        held = c.post("/v1/completions", json={"model": MODEL, "prompt": "hey", "max_tokens": 8, "temperature": 0,
                                               "stop": [stop], "min_tokens": 4}).json()["choices"][0]["text"]
        assert cut == want[: want.index(stop)] and len(held) >= 3 and want.startswith(held)


def test_tokenize_and_detokenize_as_vllm_serves_them(client) -> None:
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}).json()
    assert r == {"count": 3, "max_model_len": 512, "tokens": FakeCodec().encode("hi")}
    chat = client.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == FakeCodec().apply_chat_template([{"role": "user", "content": "hi"}])
    assert client.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json() == {"prompt": "hi"}
    assert client.post("/detokenize", json={"model": MODEL, "tokens": [999]}).status_code == 400
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    bad = client.post("/tokenize", content=b'{"model": "fake-llm", "prompt": "\\ud800"}',
                      headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "surrogate" in bad.json()["error"]["message"]


def test_echo_with_logprobs_gives_the_prompts_logprobs_too(client) -> None:
    """OpenAI's legacy semantics: the prompt's tokens lead the logprobs, the first with null."""
    body = {"model": MODEL, "prompt": "hey", "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
    ch = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = ch["logprobs"]
    want = _text("hey", 2, 0.0, None)
    assert ch["text"] == "hey" + want
    assert lp["tokens"] == ["", "h", "e", "y", *want]  # the BOS decodes to nothing
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [-0.5] * 5 and all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [0, 0, 1, 2, 3, 4]
    r = client.post("/v1/completions", json=body | {"stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"] and "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
