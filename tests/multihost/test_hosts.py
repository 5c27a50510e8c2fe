"""A cluster across emulated hosts (network namespaces on a bridge): the gateway and controller
in the root namespace, one agent per namespace started by hand as a supervisor would
(``lambdascale agent``, ``runtime.launcher = external``). A scale-out multicasts blocks between
namespaces, its pipelines run stages on different hosts, and the tokens equal a single engine's.
Traffic goes only to loopback and to the namespaces' own addresses."""

from __future__ import annotations

from pathlib import Path

import yaml

from lambdascale.serve.schemas import DeploySpec
from tests.multihost.netns import agents_on, emulated_hosts, free_port, write_secret
from tests.serve.cluster_helpers import SLOW_LINKS, burst, cluster_gateway, greedy_ids, wait_status

PROMPT = [1, 5, 9, 13, 17]
N_TOKENS = 150  # long enough that the burst is still running when the controller decides (2 s tick)
BODY = {"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}


def test_a_cluster_across_three_hosts_scales_out_between_them(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    with emulated_hosts(3) as net:
        ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
        name = ck.dir.name
        want_ids = greedy_ids(ck.dir, PROMPT, N_TOKENS)
        port = free_port(net.root)
        secret = write_secret(tmp_path / "cluster.secret")
        # what each agent host reads: the cluster's runtime and transfer sections (transfer.bind: auto,
        # the address its host uses toward the controller: its namespace's)
        overrides = {"runtime.launcher": "external", "runtime.nodes": 3, "runtime.controller_bind": net.root,
                     "runtime.controller_port": port, "runtime.secret_file": str(secret),
                     "runtime.register_timeout_s": 120, "control.autoscale_interval_s": 2.0,
                     # one holder: it lends stages, so a pipeline forms while the blocks still travel
                     "runtime.pipeline_helper_blocks": 4, **SLOW_LINKS}
        cfg_file = tmp_path / "agent.yaml"
        sections: dict[str, dict] = {}
        for key, value in overrides.items():
            sec, field = key.split(".")
            if sec in ("runtime", "transfer"):
                sections.setdefault(sec, {})[field] = value
        cfg_file.write_text(yaml.safe_dump(sections))
        with agents_on(net, port, cfg_file, secret):
            spec = DeploySpec(name=name, min_instances=1, max_instances=3, target_concurrency=1)
            with cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
                assert backend.core is not None
                core = backend.core
                # every agent listens on its own host's address, and the controller on the bridge's
                assert {n: core.cluster.agents[n].peer.host for n in range(3)} == \
                    {i: h.addr for i, h in enumerate(net.hosts)}
                assert core.cluster.address == (net.root, port)
                want = backend.codec(name).decode(want_ids)
                responses = burst(server.url, [{"model": name, **BODY}] * 8)
                st = wait_status(server.url, lambda st: core.scale_outs_in_progress == 0
                                 and sum(1 for i in st["instances"] if i["state"] == "full") == 3)
            assert [r.status_code for r in responses] == [200] * 8
            assert all(r.json()["choices"][0]["text"] == want for r in responses)
            assert sum(1 for i in st["instances"] if i["state"] == "full") == 3, st["instances"]
            assert core.stats.bytes_multicast > 0  # blocks crossed between namespaces
            pipes = [u.nodes for u in core.units_seen if u.pipelined]
            assert pipes and all(len(set(p)) > 1 for p in pipes), f"no pipeline across hosts: {pipes}"


def test_kernel_link_caps_bound_a_multicast_between_hosts(tmp_path: Path) -> None:
    """``Host.cap`` shapes each host's link with tc (tbf): a multicast between the namespaces then
    takes at least the bound that rate sets, with no Python token bucket on any agent."""
    import asyncio

    from lambdascale.bench.scale import multicast_bound_s
    from lambdascale.model.importers import import_model
    from lambdascale.runtime.launcher import LocalCluster
    from lambdascale.runtime.messages import HoldModel
    from lambdascale.runtime.multicast import prepare_receivers, run_multicast
    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings

    rate_mbit = 20.0
    with emulated_hosts(3) as net:
        ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
        for h in net.hosts:
            h.cap(rate_mbit=rate_mbit)
        port = free_port(net.root)
        secret = write_secret(tmp_path / "cluster.secret")
        runtime = RuntimeSettings(launcher="external", nodes=3, controller_bind=net.root, controller_port=port,
                                  secret_file=str(secret), register_timeout_s=120)
        transfer = TransferSettings()  # uncapped in Python: only the kernel shapes these links
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(yaml.safe_dump({"runtime": runtime.model_dump(mode="json")}))
        async def main() -> float:
            async with LocalCluster(3, transfer, runtime) as lc:
                await lc.cluster.request(0, HoldModel(req=0, model_dir=str(ck.dir), ssd_cap=False))
                await prepare_receivers(lc.cluster, ck.manifest, [1, 2])
                res = await run_multicast(lc.cluster, ck.manifest, [0], [1, 2])
                assert set(res.node_full_s) == {1, 2}
                return res.completion_s

        with agents_on(net, port, cfg, secret):
            took = asyncio.run(asyncio.wait_for(main(), 180))
    bound = multicast_bound_s(3, 1, ck.manifest.n_chunks, ck.manifest.total_bytes, rate_mbit * 1e6 / 8)
    assert took >= 0.9 * bound, f"the kernel cap did not hold: {took:.2f} s against a {bound:.2f} s bound"
