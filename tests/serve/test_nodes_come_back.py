"""Nodes come back (issue 20), on the embedded default (2 agent processes, 127.0.0.1) under a steady
load of greedy completions: an agent paused (SIGSTOP) past the heartbeat limit and continued is
back as a new incarnation within 3 s and serves again; an agent killed (kill -9) is restarted by
the gateway and serves again within 10 s. In both no request fails, every output equals a single
engine's, no message of the dead incarnation reaches the controller, a dead node shows no
holdings, and no log line says ``Task exception was never retrieved``."""

from __future__ import annotations

import logging
import signal
import threading
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
from tests.serve.cluster_helpers import greedy_ids

PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10], [3, 7, 11], [1, 2, 3, 4, 5, 6]]
N_TOKENS = 12
UNOBSERVED = "Task exception was never retrieved"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[tuple[ServerThread, ClusterBackend, str, Path, Records]]:
    from lambdascale.model.importers import import_model

    d = tmp_path_factory.mktemp("models")
    ck = import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=1)
    agent_log = d / "agents.log"
    cfg = load_config(None, {
        "runtime.nodes": 2, "runtime.register_timeout_s": 240, "runtime.heartbeat_s": 0.2,
        "runtime.heartbeat_misses": 5,  # dead after 1 s of silence
        "runtime.agent_log_file": str(agent_log),
        "engine.max_batch_size": 4, "engine.max_model_len": 256})
    records = Records()
    logging.getLogger().addHandler(records)
    backend = ClusterBackend(cfg, d)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=ck.dir.name, min_instances=2, max_instances=2))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=300)
    try:
        yield server, backend, ck.dir.name, agent_log, records
    finally:
        server.stop(timeout_s=60)
        logging.getLogger().removeHandler(records)
        assert UNOBSERVED not in agent_log.read_text()
        assert not [line for line in records.lines if UNOBSERVED in line]


@pytest.fixture(scope="module")
def reference(gateway) -> dict[int, str]:
    _, backend, name, _, _ = gateway
    from lambdascale.model.checkpoint import find_model

    ck = find_model(backend.models_dir, name)
    codec = backend.codec(name)
    return {i: codec.decode(greedy_ids(ck.dir, p, N_TOKENS)) for i, p in enumerate(PROMPTS)}


class Load:
    """Clients sending greedy completions in a loop until stopped; every outcome recorded."""

    def __init__(self, url: str, model: str, clients: int = 3) -> None:
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.results: list[tuple[int, int, str]] = []  # (prompt index, status, text or error)
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        i = k
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                i = (i + 1) % len(PROMPTS)
                r = c.post("/v1/completions", json={"model": self.model, "prompt": PROMPTS[i],
                                                    "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True})
                self.results.append((i, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads), "a client request hung"


def until(cond, timeout_s: float, what: str, every_s: float = 0.05):
    """Poll ``cond`` (a condition of the gateway's state) until it is truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every_s)
    pytest.fail(f"{what} not within {timeout_s}s")


def served_by(backend: ClusterBackend, node: int, after_inc: int) -> bool:
    """A request was dispatched to a unit formed on an incarnation of ``node`` above ``after_inc``."""
    return any(u.members.get(node, 0) > after_inc and u.requests_taken for u in list(backend.core.units_seen))


def holdings_series(url: str, node: int) -> list[str]:
    return [ln for ln in httpx.get(url + "/metrics").text.splitlines()
            if ln.startswith("lambdascale_node_holdings{") and f'node="{node}"' in ln]


def check_outcomes(load: Load, reference: dict[int, str]) -> None:
    assert load.results, "no request ran"
    bad = [(i, st, txt[:200]) for i, st, txt in load.results if st != 200 or txt != reference[i]]
    assert not bad, f"{len(bad)} of {len(load.results)} requests failed or differ: {bad[:5]}"


def stale_deliveries(backend: ClusterBackend) -> list:
    """Messages that reached the controller from an incarnation after it was declared dead."""
    c = backend.cluster
    dead_at = {(e.node, e.incarnation): e.at for e in c.history if e.state.value == "dead"}
    return [(n, i, m, t) for n, i, m, t in backend._test_delivered if (n, i) in dead_at and t > dead_at[(n, i)]]


def watch_deliveries(backend: ClusterBackend) -> None:
    if not hasattr(backend, "_test_delivered"):
        backend._test_delivered = []
        backend.cluster.message_hooks.append(
            lambda n, i, m: backend._test_delivered.append((n, i, type(m).__name__, time.monotonic())))


def test_a_paused_agent_rejoins_as_a_new_incarnation_and_serves(gateway, reference) -> None:
    server, backend, name, _, _ = gateway
    c = backend.cluster
    watch_deliveries(backend)
    until(lambda: len(backend.core.deployments[name].serving) == 2, 60, "two instances")
    inc0 = c.incarnation(1)
    with Load(server.url, name) as load:
        until(lambda: len(load.results) >= 3, 60, "load running")
        backend.signal_node(1, signal.SIGSTOP)
        try:
            until(lambda: c.state(1).value == "dead", 10, "node 1 declared dead")
            st = httpx.get(server.url + "/admin/status").json()
            assert st["nodes"][1]["state"] == "dead" and st["nodes"][1]["tiers"] == {}  # holds nothing now
            assert holdings_series(server.url, 1) == []
        finally:
            backend.signal_node(1, signal.SIGCONT)
        t_cont = time.monotonic()
        until(lambda: c.state(1).value == "alive" and c.incarnation(1) > inc0, 3, "node 1 back as a new incarnation")
        back_s = time.monotonic() - t_cont
        until(lambda: served_by(backend, 1, inc0), 20, "node 1 serving again")
        until(lambda: len(load.results) >= 12, 60, "more load")
    check_outcomes(load, reference)
    assert not stale_deliveries(backend)
    st = httpx.get(server.url + "/admin/status").json()
    assert st["nodes"][1]["restarts"] == 0  # the same process came back, nothing restarted it
    assert holdings_series(server.url, 1)  # its copy counts again
    assert back_s < 3.0


def test_a_killed_agent_is_restarted_and_serves(gateway, reference) -> None:
    server, backend, name, _, _ = gateway
    c = backend.cluster
    watch_deliveries(backend)
    until(lambda: len(backend.core.deployments[name].serving) == 2, 60, "two instances")
    inc0 = c.incarnation(1)
    with Load(server.url, name) as load:
        until(lambda: len(load.results) >= 3, 60, "load running")
        t_kill = time.monotonic()
        backend.kill_node(1)
        until(lambda: c.incarnation(1) > inc0 and c.state(1).value == "alive", 10, "node 1 restarted")
        until(lambda: served_by(backend, 1, inc0), 10 - (time.monotonic() - t_kill),
              "node 1 serving within 10 s of the kill")
        until(lambda: len(load.results) >= 12, 60, "more load")
    check_outcomes(load, reference)
    assert not stale_deliveries(backend)
    st = httpx.get(server.url + "/admin/status").json()
    assert st["nodes"][1]["restarts"] == 1 and st["nodes"][1]["incarnation"] == c.incarnation(1)
    assert 'lambdascale_node_restarts_total{node="1"} 1.0' in httpx.get(server.url + "/metrics").text
