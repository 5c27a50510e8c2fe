"""The ray launcher against a local Ray kept on loopback (one Ray cluster for this module)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lambdascale[ray]')")

from lambdascale.errors import LambdaScaleError  # noqa: E402
from lambdascale.runtime.launcher import LocalCluster  # noqa: E402
from lambdascale.runtime.messages import GetStatus, HoldModel  # noqa: E402
from lambdascale.runtime.multicast import prepare_receivers, run_multicast  # noqa: E402
from lambdascale.runtime.ray_launcher import RayLauncher  # noqa: E402
from lambdascale.runtime.settings import RuntimeSettings  # noqa: E402
from lambdascale.model.manifest import read_manifest  # noqa: E402
from tests.runtime.conftest import run_async  # noqa: E402
from tests.runtime.test_agents import _gone  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=1, resources={"lambdascale_node": 3}, include_dashboard=False, log_to_driver=False,
        object_store_memory=80 << 20, _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()


def test_ray_places_agents_that_serve_a_multicast(local_ray, tiny_model: Path) -> None:
    rt = RuntimeSettings(launcher="ray", heartbeat_s=0.2)

    async def main() -> list[int]:
        lc = LocalCluster(3, runtime=rt)
        assert isinstance(lc.launcher, RayLauncher)
        async with lc:
            pids = list(lc.launcher.pids().values())
            assert os.getpid() not in pids and len(set(pids)) == 3
            st = await lc.cluster.request(2, GetStatus(req=0))
            assert st["pid"] == lc.launcher.pids()[2]
            manifest = read_manifest(tiny_model)
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            await prepare_receivers(lc.cluster, manifest, [1, 2])
            res = await run_multicast(lc.cluster, manifest, [0], [1, 2], timeout_s=30)
            assert set(res.node_full_s) == {1, 2}
        return pids

    pids = run_async(main(), timeout=120)
    assert all(_gone(p) for p in pids), "agents outlived the ray launcher"


def test_ray_too_few_nodes_is_a_clear_error(local_ray) -> None:
    async def main() -> None:
        with pytest.raises(LambdaScaleError, match=r"offers 3 units of resource 'lambdascale_node' but 4 agents"):
            async with LocalCluster(4, runtime=RuntimeSettings(launcher="ray", register_timeout_s=1)):
                pass

    run_async(main())


def test_ray_restarts_a_killed_agent_as_a_new_incarnation(local_ray) -> None:
    """kill -9 of an agent on Ray: its hosting actor restarts it (capped backoff), the new process
    registers as the node's next incarnation with a new pid, and the restart is counted."""
    rt = RuntimeSettings(launcher="ray", heartbeat_s=0.2, respawn_backoff_s=0.1)

    async def main() -> None:
        async with LocalCluster(2, runtime=rt) as lc:
            c = lc.cluster
            before = lc.launcher.pids()
            inc = c.incarnation(1)
            lc.launcher.kill(1)

            async def back() -> None:
                while not (c.incarnation(1) > inc and 1 in c.alive()):
                    await asyncio.sleep(0.02)  # polling the controller's membership
            await asyncio.wait_for(back(), 60)
            after = lc.launcher.pids()
            assert after[1] != before[1] and after[0] == before[0]
            assert lc.launcher.restarts() == {1: 1}
            st = await c.request(1, GetStatus(req=0))
            assert st["pid"] == after[1]

    run_async(main(), timeout=120)
