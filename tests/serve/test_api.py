"""OpenAI-compatible endpoints in-process (TestClient over the fake backend)."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from lambdascale.serve.fake import FakeCodec, fake_token

from .conftest import MODEL


def expected_text(prompt: str, n: int, temperature: float = 0.0, seed: int | None = None) -> str:
    ids = FakeCodec().encode(prompt)
    return bytes(fake_token(ids, i, temperature, seed) for i in range(n)).decode()


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_completion_returns_the_backends_tokens_and_usage(client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text("hello", 7)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}


def test_seeded_sampling_is_reproducible_and_seed_sensitive(client) -> None:
    def text(seed: int) -> str:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 12, "seed": seed})
        return r.json()["choices"][0]["text"]

    assert text(1) == text(1) == expected_text("abc", 12, 1.0, 1)
    assert text(1) != text(2)


def test_prompt_as_token_ids_and_out_of_vocab_id(client) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [257, 104, 105], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == expected_text("hi", 3)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 99999], "max_tokens": 3})
    assert r.status_code == 400
    assert "vocabulary" in r.json()["error"]["message"]


def test_chat_completion_applies_template(client) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = FakeCodec().apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    want = bytes(fake_token(ids, i, 0.0, None) for i in range(5)).decode()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_stop_string_cuts_text_and_finishes_with_stop(client) -> None:
    full = expected_text("hello", 40)
    stop = full[10:12]
    cut = full.index(stop)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 40, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:cut]
    assert choice["finish_reason"] == "stop"
    # Streaming gives the same text, never showing any part of the stop string.
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 40, "temperature": 0,
                                             "stop": [stop], "stream": True})
    parts = [json.loads(p) for p in sse_payloads(r.text) if p != "[DONE]"]
    assert "".join(p["choices"][0]["text"] for p in parts) == full[:cut]
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_is_sse_ending_with_done_and_usage(client) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hey"}], "max_tokens": 6, "stream": True,
        "temperature": 0, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert len(text) == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_models_health_metrics(client) -> None:
    assert client.get("/v1/models").json() == {
        "object": "list", "data": [{"id": MODEL, "object": "model", "created": pytest.approx(0, abs=2**40),
                                    "owned_by": "lambdascale", "max_model_len": 512}]}
    one = client.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200 and one.json()["max_model_len"] == 512 and one.json()["id"] == MODEL
    assert client.get("/v1/models/nope").status_code == 404
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == [MODEL] and h["nodes_alive"] == 1
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 3})
    text = client.get("/metrics").text
    assert f'lambdascale_requests_total{{endpoint="completions",model="{MODEL}",outcome="ok"}} 1.0' in text
    assert 'lambdascale_requests_total{endpoint="completions",model="_unknown",outcome="not_found"} 1.0' in text
    assert f'lambdascale_time_to_first_token_seconds_count{{model="{MODEL}"}} 1.0' in text
    assert f'lambdascale_inter_token_latency_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert f'lambdascale_instances{{model="{MODEL}",state="full"}} 1.0' in text
    assert f'lambdascale_queue_length{{model="{MODEL}"}} 0.0' in text
    for series in ("lambdascale_bytes_multicast_total", "lambdascale_nodes_alive 1.0"):
        assert series in text


def test_each_app_has_its_own_metrics_registry(make_app) -> None:
    a, _ = make_app()
    b, _ = make_app()
    with TestClient(a) as ca, TestClient(b) as cb:
        ca.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert "outcome=\"ok\"" in ca.get("/metrics").text
        assert "outcome=\"ok\"" not in cb.get("/metrics").text


BAD_REQUESTS = [
    # (endpoint, raw body, status, param or message fragment)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1,2]", 400, "JSON object"),
    ("/v1/completions", b"", 400, "JSON object"),
    ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": 5, "prompt": "x"}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 100000}).encode(), 400, "context length"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 600}).encode(), 400, "context length"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": True}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "top_k": -5}).encode(), 400, "top_k"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 17}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 2, "best_of": 1}).encode(), 400, "best_of"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "best_of": 3, "stream": True}).encode(), 400, "best_of"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}).encode(), 400, "presence_penalty"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "repetition_penalty": 0}).encode(), 400, "repetition_penalty"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logit_bias": {"999": 1}}).encode(), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop_token_ids": [999]}).encode(), 400, "stop_token_ids"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 3}).encode(), 400, "min_tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logprobs": 21}).encode(), 400, "logprobs"),
    ("/v1/completions", b'{"model": "fake-llm", "prompt": "a\\ud800b"}', 400, "surrogate"),
    ("/v1/completions", b'{"model": "fake-llm", "prompt": ["a\\udfffb"]}', 400, "prompt.0"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": ""}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": list("abcde")}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": []}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [-1]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "does not exist"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": ""}]}).encode(), 400, "text"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                         "max_completion_tokens": 0}).encode(), 400, "max_completion_tokens"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "gpt-4"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 2}).encode(), 400, "logprobs"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                         "logprobs": True, "top_logprobs": 21}).encode(), 400, "top_logprobs"),
    ("/v1/chat/completions", b'{"model": "fake-llm", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "fake-llm", "messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "\\ud83d"}]}]}', 400, "surrogate"),
]


@pytest.mark.parametrize(("path", "raw", "status", "fragment"), BAD_REQUESTS)
def test_bad_input_gets_openai_error_body(client, path: str, raw: bytes, status: int, fragment: str) -> None:
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment.lower() in (err["message"] + " " + str(err["param"])).lower()
    assert err["type"] == "invalid_request_error"


def test_oversized_body_is_413_and_unknown_route_404(make_app) -> None:
    app, _ = make_app(max_request_bytes=2048)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 5000})
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = c.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()


def test_api_keys_guard_inference_and_admin_and_are_never_logged(make_app, caplog) -> None:
    user_key, admin_key = "sk-user-SECRET-123", "sk-admin-SECRET-456"
    app, _ = make_app(api_keys=[user_key], admin_api_keys=[admin_key])
    caplog.set_level(logging.DEBUG)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=body).status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "wrong" not in r.text
        assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {user_key}"}).status_code == 200
        assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {admin_key}"}).status_code == 200
        assert c.get("/v1/models").status_code == 401
        # Admin needs the admin key; a user key is not enough.
        assert c.get("/admin/status", headers={"Authorization": f"Bearer {user_key}"}).status_code == 401
        assert c.get("/admin/status", headers={"Authorization": f"Bearer {admin_key}"}).status_code == 200
        spec = {"name": "other", "max_instances": 2}
        assert c.post("/admin/models", json=spec, headers={"Authorization": f"Bearer {user_key}"}).status_code == 401
        assert c.post("/admin/models", json=spec, headers={"Authorization": f"Bearer {admin_key}"}).status_code == 201
        # Health and metrics stay open for probes and scrapers.
        assert c.get("/health").status_code == 200
    logged = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert caplog.records, "expected the gateway to log something (deploys)"
    assert user_key not in logged and admin_key not in logged
    # The config never prints keys either.
    assert user_key not in app.state.gateway.config.model_dump_json()


def test_registered_model_that_backend_cannot_serve_is_503(make_app) -> None:
    from lambdascale.serve.fake import FakeBackend

    app, _ = make_app(backend=FakeBackend(known_models={"something-else"}))
    with TestClient(app) as c:
        # The registered MODEL failed to deploy at startup: it is not listed, so 404, not 5xx-crash.
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 404
        r = c.post("/admin/models", json={"name": "missing"})
        assert r.status_code == 404 and "known" in r.json()["error"]["message"]


def test_request_without_a_first_token_in_time_ends_with_503(make_app) -> None:
    app, backend = make_app(first_token_timeout_s=0.2)
    with TestClient(app) as c:
        backend.pause()  # nothing is generated, as when no instance can start
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "first_token_timeout_s" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert len(backend.aborted) == 1 and backend.capacity(MODEL).running == 0
        backend.resume()
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_model_the_backend_dropped_is_503_not_500(make_app) -> None:
    app, backend = make_app()
    with TestClient(app) as c:
        c.portal.call(backend.undeploy, MODEL)  # the backend forgets it; the gateway still lists it
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503, r.text
