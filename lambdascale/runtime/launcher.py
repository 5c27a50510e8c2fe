"""Start a cluster of node agents: :func:`make_launcher` picks a launcher, :class:`LocalCluster`
runs a controller-side :class:`~lambdascale.runtime.cluster.Cluster` with launched agents.

Launchers start node agents and guarantee they die with the controller; both hand agents the
controller's address, and agents register themselves with the :class:`Cluster`:

* :class:`~lambdascale.runtime.local_launcher.LocalLauncher` (``runtime.launcher = "local"``, the
  default) spawns N agent processes on this machine.
* :class:`~lambdascale.runtime.ray_launcher.RayLauncher` (``"ray"``) places one agent per Ray node.

This module is the factory above both (they import only
:mod:`lambdascale.runtime.launcher_base`); ``Launcher``, ``LocalLauncher`` and ``agent_command``
are re-exported here for importers.
"""

from __future__ import annotations

from lambdascale.runtime.cluster import Cluster
from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.local_launcher import LocalLauncher
from lambdascale.runtime.ray_launcher import RayLauncher
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import load_secret
from lambdascale.transfer.settings import TransferSettings

__all__ = ["Launcher", "LocalCluster", "LocalLauncher", "RayLauncher", "agent_command", "make_launcher"]


def make_launcher(transfer: TransferSettings, runtime: RuntimeSettings) -> Launcher:
    """The launcher ``runtime.launcher`` names (Ray itself is imported only when the ray one starts)."""
    if runtime.launcher == "local":
        return LocalLauncher(transfer, runtime)
    return RayLauncher(transfer, runtime)


class LocalCluster:
    """A controller-side :class:`Cluster` plus launched agents, as one async context manager.

    ``async with LocalCluster(4) as lc: lc.cluster.request(...)``; agents are stopped on exit,
    even when the body raises.
    """

    def __init__(self, n_nodes: int, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None,
                 launcher: Launcher | None = None) -> None:
        self.n_nodes = n_nodes
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        # runtime.secret_file's secret, or a fresh one for this cluster (handed to agents by the launcher)
        secret = load_secret(self.runtime.secret_file)
        self.cluster = Cluster(self.runtime, secret=secret, handshake_timeout_s=self.transfer.connect_timeout_s)
        self.launcher = launcher or make_launcher(self.transfer, self.runtime)

    async def __aenter__(self) -> "LocalCluster":
        addr = await self.cluster.start()
        nodes = list(range(self.n_nodes))
        try:
            await self.launcher.start(nodes, addr, self.cluster.secret)
            await self.cluster.wait_for_agents(nodes)
        except BaseException:
            await self.launcher.stop()
            await self.cluster.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cluster.close()
        await self.launcher.stop()
