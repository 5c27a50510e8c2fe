"""The memory manager acting on real agents through the cluster backend (2 local agents, tiny-llama):
after a scale-out the multicast receiver copies the model back to its host tier; after scale-in the
idle device copies are evicted while the host copies stay; a later scale from zero on both nodes
is a host-tier hit with no multicast; a copy in use is never evicted; the host capacity holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lambdascale.config import load_config
from lambdascale.serve.backend import GenerationRequest, SamplingSpec
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.schemas import DeploySpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    from lambdascale.model.importers import import_model

    d = tmp_path_factory.mktemp("models")
    ck = import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=1)
    return d, ck.dir.name


async def _wait(pred, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


async def _complete(backend: ClusterBackend, rid: str, model: str, n: int) -> list[int]:
    req = GenerationRequest(request_id=rid, model=model, prompt_ids=(1, 5, 9), output_ids=(),
                            sampling=SamplingSpec(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [ev.token_id async for ev in backend.generate(req)]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _tiers(backend: ClusterBackend, node: int, model: str) -> dict[str, bool]:
    """{tier: complete} of ``model`` on ``node`` per the agent's latest report."""
    rep = backend.core.memory.reports.get(node)
    return {} if rep is None else {t: h.blocks is None for t, h in rep.tiers_of(model).items()}


def test_copy_back_eviction_and_host_hit_scale_from_zero(tiny, tmp_path) -> None:
    models_dir, name = tiny
    cfg = load_config(None, {
        "runtime.agent_ssd_dir": str(tmp_path / "ssd"),  # each agent's own SSD tier
        "runtime.nodes": 2, "runtime.register_timeout_s": 240, "runtime.heartbeat_s": 0.5,
        "runtime.host_capacity_gb": 0.002,  # 2 MB per node: one tiny-llama (~1.3 MB) fits
        "engine.max_batch_size": 2, "engine.max_model_len": 128,
        "control.autoscale_interval_s": 0.1, "control.scale_down_cooldown_s": 0.0,
    })
    backend = ClusterBackend(cfg, models_dir)
    spec = DeploySpec(name=name, min_instances=2, max_instances=2, target_concurrency=1, keep_alive_s=0.3)
    cap = int(0.002 * 1e9)
    overcommit: list[str] = []

    def check_capacity() -> None:
        for n, rep in backend.core.memory.reports.items():
            host = sum(h.nbytes for h in rep.holdings if h.tier == "host")
            if host > cap or rep.host_free_bytes < 0 or rep.host_capacity_bytes != cap:
                overcommit.append(f"node {n}: {rep}")

    async def main() -> None:
        await backend.start()
        pids = list(backend._lc.launcher.pids().values())
        try:
            await backend.deploy(spec)  # warms node 0's host tier; node 1 gets the model by multicast
            await _wait(lambda: backend.core.scale_outs_in_progress == 0, "scale-out done")
            assert backend.core.stats.bytes_multicast > 0 and backend.core.stats.tier_hits.get("network") == 1, backend.core.stats.tier_hits
            want = await _complete(backend, "r0", name, 4)
            # copy-back: the multicast receiver ends up with a host copy (the policy asked, the agent copied)
            await _wait(lambda: _tiers(backend, 1, name).get("host") is True, "node 1 host copy")
            assert _tiers(backend, 1, name)["gpu"] is True  # its instance's copy stays while serving
            assert backend.core.stats.memory_ops["copy_backs"] >= 1
            # and the host copy seeds the node's own SSD tier (block files + manifest)
            await _wait(lambda: _tiers(backend, 1, name).get("ssd") is True, "node 1 ssd copy")
            assert (tmp_path / "ssd" / "node1" / name / "manifest.json").exists()
            check_capacity()

            # scale in to zero: both instances drain; idle device copies go, host copies stay
            await backend.deploy(spec.model_copy(update={"min_instances": 0}))
            await _wait(lambda: not backend.core.deployments[name].units, "scale-in to zero")
            await _wait(lambda: all(_tiers(backend, n, name) == {"host": True, "ssd": True} for n in (0, 1)),
                        "device copies evicted, host copies kept")
            check_capacity()
            assert backend.core.stats.memory_ops["evicted"] >= 2

            # scale from zero: host-tier hits on the nodes that kept host copies, no multicast, no store load
            mc, before = backend.core.stats.bytes_multicast, dict(backend.core.stats.tier_hits)
            got = await asyncio.gather(*(_complete(backend, f"z{i}", name, 4) for i in range(3)))
            assert all(g == want for g in got)
            assert backend.core.stats.bytes_multicast == mc
            assert backend.core.stats.tier_hits.get("host", 0) >= before.get("host", 0) + 1
            for t in ("network", "store", "gpu"):
                assert backend.core.stats.tier_hits.get(t, 0) == before.get(t, 0), (t, before, backend.core.stats.tier_hits)
            # in use: the policy never asked for an eviction the agents refused
            assert backend.core.stats.memory_ops["evict_refused"] == 0
            check_capacity()
            assert not overcommit, overcommit
        finally:
            await backend.close()
        await _wait(lambda: all(_gone(p) for p in pids), "agents exited", timeout=10)

    asyncio.run(asyncio.wait_for(main(), 150))


def test_idle_model_past_keep_alive_makes_room_for_a_hotter_one(tiny, tmp_path) -> None:
    """One node whose host tier fits one model: B's copy-back evicts A's idle, expired host copy (LRU),
    never A's copy while A is in use, and never over-commits the tier."""
    from lambdascale.model.importers import import_model

    models_dir, a = tiny
    b = import_model("synthetic:tiny-llama", models_dir, name="tiny-b", n_blocks=4, chunks_per_block=1, seed=5).dir.name
    cfg = load_config(None, {
        "runtime.nodes": 1, "runtime.register_timeout_s": 240, "runtime.heartbeat_s": 0.5,
        "runtime.host_capacity_gb": 0.002, "engine.max_batch_size": 2, "engine.max_model_len": 128,
        "control.autoscale_interval_s": 0.1, "control.scale_down_cooldown_s": 0.0,
    })
    backend = ClusterBackend(cfg, models_dir)
    cap = int(0.002 * 1e9)
    seen: list[tuple[bool, bool]] = []  # (A host copy, B host copy) on every observation

    def observe() -> dict[str, bool]:
        rep = backend.core.memory.reports.get(0)
        if rep is not None:
            assert rep.host_capacity_bytes - rep.host_free_bytes <= cap
            assert sum(h.nbytes for h in rep.holdings if h.tier == "host") <= cap
            seen.append(("host" in rep.tiers_of(a), "host" in rep.tiers_of(b)))
        return {m: t for m in (a, b) for t in [_tiers(backend, 0, m)]}

    async def main() -> None:
        await backend.start()
        try:
            await backend.deploy(DeploySpec(name=a, min_instances=0, max_instances=1, keep_alive_s=0.3))
            await _complete(backend, "a0", a, 3)  # scale from zero from the warmed host copy
            await _wait(lambda: not backend.core.deployments[a].units and observe()[a] == {"host": True},
                        "A scaled to zero, host copy kept")
            # B does not fit next to A: its deploy cannot warm the host tier, its instance loads from the store
            await backend.deploy(DeploySpec(name=b, min_instances=0, max_instances=1, keep_alive_s=0.3))
            assert observe()[a] == {"host": True}
            await _complete(backend, "b0", b, 3)
            # B is hotter and A's copy idle past keep-alive: the policy evicts A to copy B back
            await _wait(lambda: observe()[b].get("host") is True, "B copied back to host")
            assert "host" not in observe()[a]
            assert backend.core.stats.memory_ops["evicted"] >= 1 and backend.core.stats.memory_ops["evict_refused"] == 0
            assert not any(x and y for x, y in seen), "both host copies at once would over-commit the tier"
            # an undeployed model's copies are evicted from every tier and its buffers freed
            await backend.undeploy(b)
            await _wait(lambda: observe()[b] == {} and b not in backend.core.memory.reports[0].buffers, "B's copies evicted")
            assert b not in backend.core.memory.held.get(0, set())
        finally:
            await backend.close()

    asyncio.run(asyncio.wait_for(main(), 120))
