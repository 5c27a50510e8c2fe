"""A Ray cluster across emulated hosts: a Ray head in the root namespace (the gateway's host) and
a Ray worker in each of three network namespaces, started with ``ray start`` as the README says,
with token authentication on (a token in ``~/.ray/auth_token``, which every node and the driver
find). ``runtime.launcher = ray`` puts one agent on each worker; the controller listens on the
driver's node address, each agent's transport on its own namespace's. A scale-out multicasts
between namespaces and runs pipelines whose stages sit on different ones, with a single engine's
tokens; then ``lambdascale serve --launcher ray`` (the CLI, as a user runs it) serves the demo
model across the same cluster with a single engine's greedy answer."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest

from lambdascale.serve.schemas import DeploySpec
from tests.multihost.netns import Network, emulated_hosts, free_port
from tests.multihost.raynodes import ray_env, ray_home, ray_node, wait_for_port
from tests.runtime.test_ray_readme import _serve, _stop, _url_or_exit, demo_greedy_text, expected_greedy
from tests.serve.cluster_helpers import SLOW_LINKS, burst, cluster_gateway, greedy_ids, wait_status

pytestmark = pytest.mark.ray
PROMPT = [1, 5, 9, 13, 17]
N_TOKENS = 240  # long enough that the burst is still running when the controller decides (0.5 s tick)
BODY = {"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}


@contextlib.contextmanager
def ray_across(net: Network, env: dict[str, str]) -> Iterator[str]:
    """A Ray head on the root namespace (no agent slot: the gateway's host) and one worker per
    namespace with one slot each; yields the head's address."""
    port = free_port(net.root)
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(ray_node(env, head_port=port, ip=net.root, resources={"lambdascale_node": 0}))
        wait_for_port(net.root, port, head)
        # `ray start --address` does not turn token auth on by itself as the head does: a worker
        # is told (the README's multi-host step), and finds the token in its ~/.ray/auth_token
        worker_env = dict(env, RAY_AUTH_MODE="token")
        for h in net.hosts:
            stack.enter_context(ray_node(worker_env, address=f"{net.root}:{port}", ip=h.addr,
                                         resources={"lambdascale_node": 1}, prefix=h.exec_argv([])))
        yield f"{net.root}:{port}"


@contextlib.contextmanager
def joined_as_driver(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process joins Ray as the gateway's driver with ``home`` as its HOME; Ray and its
    auth settings are put back afterwards so later Ray tests in this process start clean."""
    import ray

    monkeypatch.setenv("HOME", str(home))
    for k in [k for k in os.environ if k.startswith("RAY_AUTH")]:
        monkeypatch.delenv(k)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE", None)  # what ray_connect set for the driver
        with contextlib.suppress(Exception):
            from ray._private.authentication_test_utils import reset_auth_token_state

            reset_auth_token_state()


def test_ray_cluster_across_three_hosts(tmp_path: Path, demo_model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lambdascale.model.importers import import_model

    with emulated_hosts(3) as net:
        home = ray_home(tmp_path)
        env = ray_env(home)
        with ray_across(net, env) as address:
            ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
            name = ck.dir.name
            want_ids = greedy_ids(ck.dir, PROMPT, N_TOKENS)
            # heartbeat_misses: 3 Ray nodes, 3 agents and a gateway on two cores miss beats under load
            overrides = {"runtime.launcher": "ray", "runtime.address": address, "runtime.nodes": 3,
                         "runtime.register_timeout_s": 120, "control.autoscale_interval_s": 0.5,
                         "runtime.heartbeat_misses": 30,
                         "runtime.pipeline_helper_blocks": 4, **SLOW_LINKS}
            spec = DeploySpec(name=name, min_instances=1, max_instances=3, target_concurrency=1)
            with joined_as_driver(home, monkeypatch), cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
                core = backend.core
                assert core is not None
                hosts = {core.cluster.agents[n].peer.host for n in range(3)}
                assert hosts == {h.addr for h in net.hosts}, hosts  # one agent per namespace, on its own address
                assert core.cluster.address[0] == net.root  # the driver's node address, not loopback
                assert os.environ.get("RAY_AUTH_MODE") == "token"  # found the token as `ray start` did
                want = backend.codec(name).decode(want_ids)
                responses = burst(server.url, [{"model": name, **BODY}] * 8)
                st = wait_status(server.url, lambda st: core.scale_outs_in_progress == 0
                                 and sum(1 for i in st["instances"] if i["state"] == "full") == 3)
                pipes = [u.nodes for u in core.units_seen if u.pipelined]
                multicast = core.stats.bytes_multicast
            assert [r.status_code for r in responses] == [200] * 8
            assert all(r.json()["choices"][0]["text"] == want for r in responses)
            assert sum(1 for i in st["instances"] if i["state"] == "full") == 3, st["instances"]
            assert multicast > 0  # blocks crossed between namespaces
            assert pipes and all(len(set(p)) > 1 for p in pipes), f"no pipeline across hosts: {pipes}"

            # the CLI on the same cluster: the demo model, a single engine's greedy tokens
            ids, want_text = expected_greedy(demo_model_dir, 12)
            proc = _serve(env, address, 3, demo_model_dir, tmp_path)
            try:
                url, out = _url_or_exit(proc, 240)
                assert url is not None, out + _stop(proc)
                assert demo_greedy_text(url, ids, 12) == want_text
            finally:
                _stop(proc)
