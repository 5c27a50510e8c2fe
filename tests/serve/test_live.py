"""The gateway under a real uvicorn server on 127.0.0.1 (one per module): SDK, load, faults."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from lambdascale.serve.app import create_app
from lambdascale.serve.fake import FakeBackend, FakeCodec, fake_token
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

from .conftest import MODEL, make_config

SLOTS = 2          # per instance
INSTANCES = 2
QUEUE = 2          # serve.max_queue_per_model


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[ServerThread, FakeBackend]]:
    backend = FakeBackend(n_instances=INSTANCES, slots_per_instance=SLOTS, token_delay_s=0.002)
    cfg = make_config(max_queue_per_model=QUEUE, retry_after_s=2)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=MODEL))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start()
    try:
        yield server, backend
    finally:
        server.stop()
    assert not server._thread.is_alive()


@pytest.fixture
def fresh(live) -> Iterator[tuple[ServerThread, FakeBackend]]:
    """The live server with every instance alive and tokens flowing, restored after each test."""
    server, backend = live
    yield server, backend
    backend.resume()
    for i in range(INSTANCES):
        server.call(lambda i=i: backend.revive_instance(i))


def test_openai_sdk_works_unchanged_streaming_included(fresh) -> None:
    server, _ = fresh
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0)
    want = bytes(fake_token(FakeCodec().encode("hello"), i, 0.0, None) for i in range(5)).decode()
    assert r.choices[0].text == want and r.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0.7, seed=3,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0.7, seed=3)
    assert text == full.choices[0].message.content and len(text) == 9
    assert chunks[-1].usage.completion_tokens == 9
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)


def test_client_disconnect_mid_stream_frees_slot_within_a_second(fresh) -> None:
    server, backend = fresh
    before = len(backend.aborted)
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", server.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert backend.capacity(MODEL).running == 1
            backend.pause()  # no more tokens: only the disconnect can end the request now
            t0 = time.monotonic()
        # leaving the block closes the connection mid-stream
    deadline = t0 + 1.0
    while time.monotonic() < deadline and len(backend.aborted) == before:
        time.sleep(0.01)
    assert len(backend.aborted) == before + 1, "backend never saw the abort"
    assert time.monotonic() - t0 < 1.0
    assert backend.capacity(MODEL).running == 0


def test_overload_gets_429_with_retry_after_and_admitted_requests_finish(fresh) -> None:
    server, backend = fresh
    limit = INSTANCES * SLOTS + QUEUE
    backend.pause()

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:
            body = {"model": MODEL, "prompt": "p", "max_tokens": 4, "temperature": 0}
            admitted = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(limit)]
            # Wait until the gateway has admitted them all (slots + queue full).
            for _ in range(500):
                st = (await c.get("/admin/status")).json()
                if st["admitted"].get(MODEL) == limit:
                    break
                await asyncio.sleep(0.01)
            assert st["admitted"][MODEL] == limit
            assert st["queues"][MODEL] == QUEUE
            over = await c.post("/v1/completions", json=body)
            backend.resume()
            return list(await asyncio.gather(*admitted)), over

    done, over = asyncio.run(scenario())
    assert over.status_code == 429
    assert over.headers["retry-after"] == "2"
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200] * limit
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in done)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'outcome="overloaded"' in metrics


def test_dead_node_moves_requests_then_503_when_no_capacity_left(fresh) -> None:
    server, backend = fresh
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = client.completions.create(model=MODEL, prompt="move me", max_tokens=200, temperature=0).choices[0].text

    # One node dies mid-stream: the request moves with its token state, the text is unchanged.
    moves = backend.moves
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", server.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "move me", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            got = [json.loads(next(line for line in lines if line.startswith("data: "))[6:])["choices"][0]["text"]]
            backend.pause()  # hold it mid-stream while its node dies
            where = {inst.instance_id for inst in backend.status().instances if inst.running}
            victim = int(next(iter(where)).split("-")[1])
            server.call(lambda: backend.kill_instance(victim))
            backend.resume()
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    got.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(got) == want
    assert backend.moves == moves + 1

    # The last node dies mid-stream: the stream ends with a clear 503 error event.
    stream = client.completions.create(model=MODEL, prompt="doomed", max_tokens=400, stream=True)
    first = next(iter(stream))
    backend.pause()
    assert first.choices[0].text
    other = 1 - victim
    server.call(lambda: backend.kill_instance(other))
    backend.resume()
    with pytest.raises(openai.APIError, match="capacity lost"):
        for _ in stream:
            pass
    # New requests get a 503 (not a hang, not a 500) and the gateway keeps serving.
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert exc.value.status_code == 503
    assert httpx.get(server.url + "/health").status_code == 200
    server.call(lambda: backend.revive_instance(other))
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].text


def test_bench_replay_against_the_live_gateway(fresh, tmp_path) -> None:
    from lambdascale.bench.serve import TraceRequest, replay, write_plots

    server, _ = fresh
    workload = [TraceRequest(arrival_s=i * 0.02, input_tokens=5 + i, output_tokens=4) for i in range(12)]
    result = asyncio.run(replay(server.url, MODEL, workload, poll_s=0.05))
    s = result.summary()
    assert s["ok"] == 12 and s["by_status"] == {"200": 12}
    assert all(r.output_tokens == 4 and len(r.itl_s) == 3 for r in result.requests)
    assert 0 < s["ttft_p50_ms"] < 5000
    assert result.samples and result.samples[0].nodes_busy == INSTANCES
    paths = write_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["request_rate.png", "instances.png", "ttft.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_first_token_or_a_whole_completion_frees_the_slot(fresh, stream: bool) -> None:
    server, backend = fresh
    before = len(backend.aborted)
    backend.pause()  # nothing will be generated: the request can only end by the client leaving
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.3,
                   json={"model": MODEL, "prompt": "wait", "max_tokens": 5, "stream": stream})
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and len(backend.aborted) == before:
        time.sleep(0.01)
    assert len(backend.aborted) == before + 1
    assert backend.capacity(MODEL).running == 0
    st = httpx.get(server.url + "/admin/status").json()
    assert st["admitted"][MODEL] == 0


def test_status_watch_refreshes_until_stopped(fresh) -> None:
    import argparse
    import io
    import threading

    from rich.console import Console

    from lambdascale.serve.cli import watch_status

    server, _ = fresh
    console = Console(file=io.StringIO(), force_terminal=True, record=True, width=150)
    stop = threading.Event()
    result: list[int] = []
    args = argparse.Namespace(url=server.url, api_key=None)
    t = threading.Thread(target=lambda: result.append(watch_status(args, console, stop, 0.05)))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and console.export_text(clear=False).count("fake-0") < 3:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert result and result[0] >= 2
    text = console.export_text()
    assert "fake-0" in text and MODEL in text and "instances and pipelines" in text


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"model": "fake-llm", "prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "fake-llm", "prompt": "a\\ud800b", "max_tokens": 2, "stream": true}'),
    ("/v1/chat/completions", b'{"model": "fake-llm", "messages": [{"role": "user", "content": "\\udc00"}]}'),
])
def test_lone_surrogate_is_a_400_and_the_server_keeps_serving(fresh, path: str, body: bytes) -> None:
    """Issue 19: a lone UTF-16 surrogate gave 500 (chat) or a reset connection (completions)."""
    server, _ = fresh
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "surrogate" in err["message"] and err["type"] == "invalid_request_error" and err["param"]
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2


def test_openai_sdk_reads_logprobs_and_n_choices(fresh) -> None:
    """logprobs, top_logprobs and n as the SDK parses them, streamed and not (fake backend: the
    token's logprob is -0.5 and its alternatives the next letters)."""
    server, _ = fresh
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0.8, seed=5, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # independent choices (seeded per choice)
    for c in r.choices:
        lp = c.logprobs.content
        assert "".join(t.token for t in lp) == c.message.content
        assert all(t.logprob == -0.5 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in lp)
    # the same request again: the same choices (seeded)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0.8, seed=5, n=3)
    assert [c.message.content for c in again.choices] == texts
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0.8, seed=5, n=2,
                                       logprobs=1, stream=True)
    got: dict[int, str] = {0: "", 1: ""}
    n_lp = {0: 0, 1: 0}
    for chunk in stream:
        for ch in chunk.choices:
            got[ch.index] += ch.text
            if ch.logprobs is not None:
                n_lp[ch.index] += len(ch.logprobs.tokens)
    plain = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0.8, seed=5, n=2)
    assert [got[0], got[1]] == [c.text for c in plain.choices] and n_lp == {0: 3, 1: 3}
