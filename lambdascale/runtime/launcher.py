"""Start a cluster of node agents: :func:`make_launcher` picks a launcher, :class:`LocalCluster`
runs a controller-side :class:`~lambdascale.runtime.cluster.Cluster` with launched agents.

Launchers start node agents and guarantee they die with the controller; both hand agents the
controller's address, and agents register themselves with the :class:`Cluster`:

* :class:`~lambdascale.runtime.local_launcher.LocalLauncher` (``runtime.launcher = "local"``, the
  default) spawns N agent processes on this machine.
* :class:`~lambdascale.runtime.ray_launcher.RayLauncher` (``"ray"``) places one agent per Ray node.
* :class:`~lambdascale.runtime.external_launcher.ExternalLauncher` (``"external"``) launches
  nothing: supervised agents on hosts of one's own register by themselves.

:func:`controller_addresses` says where the controller listens and what agents dial.

This module is the factory above both (they import only
:mod:`lambdascale.runtime.launcher_base`); ``Launcher``, ``LocalLauncher`` and ``agent_command``
are re-exported here for importers.
"""

from __future__ import annotations

from lambdascale.errors import LambdaScaleError
from lambdascale.runtime.cluster import Cluster
from lambdascale.runtime.external_launcher import ExternalLauncher
from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.local_launcher import LocalLauncher
from lambdascale.runtime.ray_launcher import RayLauncher
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.addresses import LOOPBACK, resolve, route_source
from lambdascale.transfer.auth import load_secret
from lambdascale.transfer.conn import tls_contexts
from lambdascale.transfer.settings import TransferSettings

__all__ = ["ExternalLauncher", "Launcher", "LocalCluster", "LocalLauncher", "RayLauncher", "agent_command",
           "controller_addresses", "make_launcher"]


def controller_addresses(runtime: RuntimeSettings) -> tuple[str, str]:
    """(address the controller binds, address agents dial) for ``runtime``.

    Defaults by launcher: loopback for ``local`` (its agents are children on this host); for
    ``ray`` the address this host uses toward the Ray head (the driver's node IP; loopback when
    Ray runs here, ``runtime.address`` unset or ``auto``); every interface for ``external``, whose
    agents are told the address by their operator. ``runtime.controller_bind`` (an address or an
    interface name) and ``runtime.controller_advertise`` override them.
    """
    head = None
    if runtime.launcher == "ray" and runtime.address and runtime.address not in ("auto", "local"):
        head = runtime.address.rsplit(":", 1)[0]
    toward = route_source(head) if head else LOOPBACK
    default = {"local": LOOPBACK, "ray": toward, "external": "0.0.0.0"}[runtime.launcher]
    bind = resolve(runtime.controller_bind, toward=head, default=default)
    if runtime.controller_advertise is not None:
        return bind, resolve(runtime.controller_advertise, toward=head)
    return bind, (toward if bind in ("0.0.0.0", "::") else bind)


def make_launcher(transfer: TransferSettings, runtime: RuntimeSettings) -> Launcher:
    """The launcher ``runtime.launcher`` names (Ray itself is imported only when the ray one starts)."""
    if runtime.launcher == "local":
        return LocalLauncher(transfer, runtime, stderr_path=runtime.agent_log_file)
    if runtime.launcher == "external":
        if runtime.controller_port == 0:
            raise LambdaScaleError("runtime.launcher = external needs a fixed runtime.controller_port: "
                                   "the supervised agents are told HOST:PORT before the controller starts")
        return ExternalLauncher()
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
        bind, advertise = controller_addresses(self.runtime)
        if self.runtime.launcher == "external" and self.runtime.secret_file is None:
            raise LambdaScaleError("runtime.launcher = external needs runtime.secret_file: the supervised agents "
                                   "prove the same secret, each given a copy as --token-file (mode 0600)")
        # runtime.secret_file's secret, or a fresh one for this cluster (handed to agents by the launcher)
        secret = load_secret(self.runtime.secret_file)
        t = self.transfer
        tls = tls_contexts(t.tls_cert, t.tls_key, t.tls_ca)  # the controller's side of mutual TLS, when on
        self.cluster = Cluster(self.runtime, host=bind, advertise=advertise, port=self.runtime.controller_port,
                               secret=secret, handshake_timeout_s=self.transfer.connect_timeout_s,
                               digest=self.transfer.digest, tls=tls[0] if tls is not None else None)
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
