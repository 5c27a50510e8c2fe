"""Agent memory tiers on real agent processes: holdings reports, evictions refused while a copy is in
use, background copy-backs (gpu -> host, -> own SSD tier) and a host capacity never over-committed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.agent_memory import AgentMemory, MemoryRefusedError, MemTier
from lambdascale.runtime.cluster import AgentRequestError, Cluster
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import (
    GetStatus,
    HoldingsReport,
    HoldModel,
    SendChunks,
)
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.pipeline import RemotePipeline, StagePlacement
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async

CAP_GB = 0.002  # 2 MB: one tiny-llama (~1.3 MB) fits in a node's host tier, two do not


@pytest.fixture(scope="module")
def second_model(tiny_model: Path) -> Path:
    from lambdascale.model.importers import import_model

    return import_model("synthetic:tiny-llama", tiny_model.parent, name="tiny-b", n_blocks=2,
                        chunks_per_block=1, seed=7).dir


async def _until(c: Cluster, node: int, pred, what: str, timeout: float = 20.0) -> HoldingsReport:
    """Poll ``node``'s holdings until ``pred(report)`` (a background copy finishing); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        rep = await c.holdings(node)
        if pred(rep):
            return rep
        if loop.time() > end:
            raise AssertionError(f"node {node}: {what} not reached within {timeout}s: {rep}")
        await asyncio.sleep(0.02)


def test_tiers_evict_refusals_copy_backs_and_capacity(tiny_model: Path, second_model: Path, tmp_path: Path) -> None:
    man = read_manifest(tiny_model)
    name, total = man.name, man.total_bytes
    rt = RuntimeSettings(heartbeat_s=0.5, host_capacity_gb=CAP_GB, agent_ssd_dir=str(tmp_path / "ssd"))

    async def main() -> None:
        async with LocalCluster(2, runtime=rt) as lc:
            c = lc.cluster
            # (a) a host-tier load reports bytes, capacity and free space
            d = await c.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            assert d["source"] == "store"
            r0 = await c.holdings(0)
            h = r0.tiers_of(name)
            assert set(h) == {"host"} and h["host"].nbytes == total and h["host"].blocks is None
            assert r0.host_capacity_bytes == int(CAP_GB * 1e9)
            assert 0 < r0.host_capacity_bytes - r0.host_free_bytes - total < 4096  # one aligned reservation
            assert r0.ssd_capacity_bytes > 0 and r0.buffers == [name]

            # (b) node 1 receives by multicast; while chunks are still arriving and a send list waits
            # on one, its (gpu) copy is in use: eviction is refused and nothing is freed
            await prepare_receivers(c, man, [1])
            await c.request(1, SendChunks(req=0, model=name, epoch=0, sends=[(man.n_chunks - 1, 0)]))
            with pytest.raises(AgentRequestError, match=r"cannot evict 'synthetic-tiny-llama'.*in use.*send list.*receive"):
                await c.evict(1, name, "gpu")
            assert name in (await c.request(1, GetStatus(req=0)))["models"]
            await run_multicast(c, man, [0], [1])
            r1 = await _until(c, 1, lambda r: not r.tiers_of(name)["gpu"].in_use, "send list done")
            assert set(r1.tiers_of(name)) == {"gpu"} and r1.tiers_of(name)["gpu"].blocks is None
            assert r1.host_free_bytes == r1.host_capacity_bytes  # a device copy costs no host capacity

            # a stage built from it: the gpu copy is in use until the pipeline dissolves
            pipe = RemotePipeline(c, man, [StagePlacement(1, (0, man.n_blocks))], max_len=64, max_seqs=2,
                                  max_step_tokens=64, name="mem-p")
            await pipe.form()
            with pytest.raises(AgentRequestError, match=r"in use \(stage\(s\) of pipeline\(s\) \['mem-p'\]"):
                await c.evict(1, name, "gpu")

            # (c) copy-back gpu -> host and -> ssd, in the background, while the stage stays up
            started, rep = await c.copy_back(1, name, "host")
            assert started and rep.host_free_bytes < rep.host_capacity_bytes  # reserved before copying
            await _until(c, 1, lambda r: r.tiers_of(name).get("host") is not None
                         and r.tiers_of(name)["host"].blocks is None, "host copy complete")
            assert (await c.copy_back(1, name, "host"))[0] is False  # already there: a no-op
            await c.copy_back(1, name, "ssd")
            await _until(c, 1, lambda r: "ssd" in r.tiers_of(name) and r.tiers_of(name)["ssd"].blocks is None,
                         "ssd copy complete")
            files = sorted(p.name for p in (tmp_path / "ssd" / "node1" / name).iterdir())
            assert files == sorted(["manifest.json"] + [b.file for b in man.blocks])

            await pipe.dissolve()
            evicted, rep = await c.evict(1, name, "gpu")  # stage gone: the device copy goes ...
            assert evicted and set(rep.tiers_of(name)) == {"host", "ssd"} and rep.buffers == [name]  # ... host keeps bytes
            evicted, rep = await c.evict(1, name, "host")
            assert evicted and rep.buffers == [] and rep.host_free_bytes == rep.host_capacity_bytes
            assert (await c.request(1, GetStatus(req=0)))["models"] == {}

            # a later load on node 1 comes from its own SSD tier, then a host-tier hit
            assert (await c.request(1, HoldModel(req=0, model_dir=str(tiny_model), tier="gpu")))["source"] == "ssd"
            assert (await c.request(1, HoldModel(req=0, model_dir=str(tiny_model), reuse=True)))["source"] == "gpu"
            full = await c.holdings(1)
            assert set(full.tiers_of(name)) == {"gpu", "host", "ssd"}

            # (d) capacity: a second model does not fit the host tier next to the first; refused, nothing changes
            with pytest.raises(AgentRequestError, match=r"host tier cannot take 'tiny-b'.*runtime.host_capacity_gb"):
                await c.request(1, HoldModel(req=0, model_dir=str(second_model)))
            after = await c.holdings(1)
            assert after.host_free_bytes == full.host_free_bytes and "tiny-b" not in after.buffers
            # as an instance's (device) copy it loads; its copy-back to host is refused, nothing reserved
            await c.request(1, HoldModel(req=0, model_dir=str(second_model), tier="gpu"))
            with pytest.raises(AgentRequestError, match=r"host tier cannot take 'tiny-b'"):
                await c.copy_back(1, "tiny-b", "host")
            assert (await c.holdings(1)).host_free_bytes == full.host_free_bytes
            # evicting the first model's host copy makes room; then the copy-back fits
            await c.evict(1, name, "host")
            assert (await c.copy_back(1, "tiny-b", "host"))[0]
            evicted, rep = await c.evict(1, name, "ssd")
            assert evicted and "ssd" not in rep.tiers_of(name) and not (tmp_path / "ssd" / "node1" / name).exists()

    run_async(main(), timeout=120)


def test_agent_memory_never_overcommits_and_refuses_in_use(tiny_model: Path) -> None:
    """Random reserve/evict sequences on the bookkeeping alone: used bytes never exceed capacity."""
    man = read_manifest(tiny_model)
    mans = [man.model_copy(update={"name": f"m{i}"}) for i in range(5)]
    mem = AgentMemory(0, 3 * man.total_bytes, None, 1)
    rng = random.Random(3)
    for _ in range(400):
        m = rng.choice(mans)
        r = mem.residency(m)
        op = rng.randrange(4)
        if op == 0:
            try:
                mem.reserve_host(r)
                r.host_blocks = set(range(m.n_blocks))
            except MemoryRefusedError as e:
                assert "runtime.host_capacity_gb" in str(e)
        elif op == 1:
            r.gpu = True
        elif op == 2:
            busy = rng.random() < 0.3
            r.stages = {"p"} if busy else set()
            had = r.gpu
            try:
                evicted, _ = mem.evict(m.name, MemTier.GPU, receiving=False, sending=False)
                assert evicted == had and not (busy and had)
            except MemoryRefusedError:
                assert busy and had and r.gpu  # refused: nothing changed
            r.stages = set()
        else:
            mem.evict(m.name, MemTier.HOST, receiving=False, sending=False)
        mem.host.check()
        held = sum(rr.nbytes for rr in mem.models.values() if rr.host)
        assert held <= mem.host.capacity
        assert mem.host.used <= mem.host.capacity
    with pytest.raises(MemoryRefusedError, match="no SSD tier"):
        mem.reserve_ssd(mem.residency(mans[0]))
    with pytest.raises(LambdaScaleError, match="chunk 0 fails its xxh64"):
        AgentMemory.verify_block(man, 0, memoryview(bytearray(man.total_bytes)))
