"""The gateway over real node agents (2 local agent processes, synthetic tiny-llama): exact text,
a node dying mid-stream moves the request with its token state, and 503 once no node is left."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

PROMPT = [1, 5, 9, 13, 17, 21]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    from lambdascale.model.importers import import_model

    d = tmp_path_factory.mktemp("models")
    ck = import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=1)
    import_model("synthetic:tiny-qwen2", d, n_blocks=2, chunks_per_block=1)
    return d, ck.dir.name


@pytest.fixture(scope="module")
def cluster_server(tiny) -> Iterator[tuple[ServerThread, ClusterBackend, str]]:
    models_dir, name = tiny
    # Generous start-up limits: three agent processes importing torch on a loaded 2-core machine.
    cfg = load_config(None, {"runtime.nodes": 3, "runtime.register_timeout_s": 240, "runtime.respawn": False,
                             "engine.max_batch_size": 4,
                             "engine.max_model_len": 256, "control.autoscale_interval_s": 30.0,
                             "serve.timeline_poll_s": 0.05})
    backend = ClusterBackend(cfg, models_dir)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=name, min_instances=2, max_instances=2))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=300)
    try:
        yield server, backend, name
    finally:
        server.stop(timeout_s=60)


def reference_tokens(models_dir: Path, name: str, n: int) -> list[int]:
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.checkpoint import find_model

    eng = Engine.from_checkpoint(find_model(models_dir, name))
    toks: list[int] = []
    for o in eng.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
        toks.extend(o.token_ids)
    return toks


def test_scale_from_zero_holds_the_request_and_logs_the_timeline(cluster_server, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="lambdascale.serve.scale")
    server, backend, _ = cluster_server
    admin = httpx.post(server.url + "/admin/models", json={"name": "synthetic-tiny-qwen2", "min_instances": 0, "max_instances": 1,
                                                           "keep_alive_s": 600}, timeout=60)
    assert admin.status_code == 201, admin.text
    st0 = httpx.get(server.url + "/admin/status").json()
    assert not [i for i in st0["instances"] if i["model"] == "synthetic-tiny-qwen2"]
    assert st0["nodes"][2]["tiers"] == {"synthetic-tiny-qwen2": ["host"]}  # deploy warmed one node's host tier
    # No instance yet: the request is held while the controller starts one, then served (not failed).
    sent_at = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "synthetic-tiny-qwen2", "prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    st = httpx.get(server.url + "/admin/status").json()
    assert [i["nodes"] for i in st["instances"] if i["model"] == "synthetic-tiny-qwen2"] == [["2"]]
    assert st["scale_events"]["up"] >= 1
    assert st["tier_hits"].get("host", 0) == st0["tier_hits"].get("host", 0) + 1  # loaded from that host copy
    tl = next(t for t in st["scale_timelines"] if t["model"] == "synthetic-tiny-qwen2")
    # The request triggered the decision at once, not at the next 30 s controller tick.
    assert 0 <= tl["decided_at"] - sent_at < 1.0, tl
    line = next(t for t in st["timeline"] if "synthetic-tiny-qwen2" in t)
    assert "decision +0ms" in line and "node 2 full" in line and "first pipeline" in line
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("first pipeline" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert any("synthetic-tiny-qwen2" in r.getMessage() and "first pipeline" in r.getMessage() for r in caplog.records)


def test_cluster_logprobs_n_and_penalties_through_the_openai_sdk(cluster_server, tiny) -> None:
    """The agents' last stage returns the raw logprobs the in-process engine computes, per token, and
    n seeded choices with penalties are the engine's tokens exactly."""
    import openai

    from lambdascale.engine.engine import Engine
    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.model.checkpoint import find_model

    server, backend, name = cluster_server
    models_dir, _ = tiny
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.completions.create(model=name, prompt=PROMPT, max_tokens=5, temperature=0.9, seed=4, n=2, logprobs=2,
                                  frequency_penalty=1.0, extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    eng = Engine.from_checkpoint(find_model(models_dir, name))
    codec = backend.codec(name)
    from lambdascale.serve.api.generation import choice_seed

    for i, choice in enumerate(r.choices):
        p = SamplingParams(max_tokens=5, temperature=0.9, seed=choice_seed(4, i), logprobs=2, frequency_penalty=1.0,
                           repetition_penalty=1.2, ignore_eos=True)
        outs = list(eng.generate(PROMPT, p))
        assert choice.text == codec.decode([t for o in outs for t in o.token_ids])
        want = [lp for o in outs for lp in o.logprobs]
        assert choice.logprobs.token_logprobs == pytest.approx([w.logprob for w in want], abs=1e-4)
        assert [max(d.values()) for d in choice.logprobs.top_logprobs] == pytest.approx(
            [w.top[0][1] for w in want], abs=1e-4)
    assert r.choices[0].text != r.choices[1].text
    # echo + logprobs: the agents' last stage returns the prompt's logprobs (every row's logits)
    echo = client.completions.create(model=name, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1,
                                     extra_body={"ignore_eos": True})
    ref = list(eng.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=1,
                                                   ignore_eos=True)))
    want = [lp.logprob for lp in ref[0].prompt_logprobs] + [lp for o in ref for lp in (x.logprob for x in o.logprobs)]
    got = echo.choices[0].logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-4) and len(got) == len(PROMPT) + 2
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=1, stream=True,
                                          stream_options={"include_usage": True})
    entries = [t for c in chat if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert entries and all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in entries)


def test_cluster_serves_exact_tokens_and_survives_a_node_death(cluster_server, tiny) -> None:
    server, backend, name = cluster_server
    models_dir, _ = tiny
    n = 200  # long enough that the stream is still running when its node is killed
    want_ids = reference_tokens(models_dir, name, n)
    codec = backend.codec(name)
    want = codec.decode(want_ids)
    st = httpx.get(server.url + "/admin/status").json()
    mine = [i for i in st["instances"] if i["model"] == name]
    assert sorted(i["nodes"][0] for i in mine) == ["0", "1"]
    # deploy warmed node 0's host tier; the floor's other instance got the model by multicast from it
    assert st["bytes_multicast"] > 0
    first = next(t for t in st["timeline"] if name in t)
    assert "first chunk" in first and "node 1 full" in first and "first pipeline" in first, first
    # Tiers as the agents report them (fastest first): node 0 was warmed in host memory at deploy;
    # both instance nodes hold the model in memory (gpu = an instance's copy; host after copy-back);
    # the idle node holds nothing.
    tiers = {node["node_id"]: node["tiers"].get(name) for node in st["nodes"]}
    assert "host" in tiers["0"], tiers
    assert all(t and set(t) <= {"gpu", "host", "ssd"} and t == sorted(t, key=["gpu", "host", "ssd"].index)
               for t in (tiers["0"], tiers["1"])), tiers
    assert tiers["2"] is None, tiers

    body = {"model": name, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["text"] == want and r["usage"]["completion_tokens"] == n

    # Kill the node serving a stream after its first token: the rest comes from the other node.
    pieces = []
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
                    break
            busy = [i for i in httpx.get(server.url + "/admin/status").json()["instances"]
                    if i["running"] and i["model"] == name]
            if busy:  # still running (not already finished): kill its node
                backend.kill_node(int(busy[0]["nodes"][0]))
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    payload = json.loads(line[6:])
                    assert "error" not in payload, payload
                    pieces.append(payload["choices"][0]["text"])
    assert "".join(pieces) == want
    assert busy, "the stream finished before the kill; the test did not exercise a move"
    assert backend.core.stats.requeued >= 1

    # Kill every node left (a node with no copy could still load the model from the store, so
    # capacity only runs out with no node at all): new requests get a clear 503, the gateway
    # keeps answering.
    for node in httpx.get(server.url + "/admin/status").json()["nodes"]:
        if node["alive"]:
            backend.kill_node(int(node["node_id"]))
    r = None
    for _ in range(3):  # the first request may be the one that discovers the death
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        if r.status_code == 503:
            break
    assert r is not None and r.status_code == 503, r.text
    assert "no instance" in r.json()["error"]["message"] or "capacity" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200
