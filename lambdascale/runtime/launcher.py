"""Launchers start node agents and guarantee they die with the controller.

* :class:`LocalLauncher` (the embedded default) spawns N agent processes on this machine.
  Each agent is armed three ways against orphaning: ``PR_SET_PDEATHSIG`` (SIGKILL when the
  launcher's process dies), a parent-pid check every heartbeat, and exit on control-channel EOF.
* :class:`RayLauncher` (``lambdascale.runtime.ray_launcher``) places one agent per Ray node.

Both hand agents the controller's address; agents register themselves with the :class:`Cluster`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod

from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings


def agent_command(
    node: int, controller: tuple[str, int], transfer: TransferSettings, runtime: RuntimeSettings, parent_pid: int
) -> list[str]:
    """argv that starts one agent (shared by the launchers)."""
    return [
        sys.executable, "-m", "lambdascale.runtime.agent",
        "--controller", f"{controller[0]}:{controller[1]}",
        "--node", str(node),
        "--transfer-json", transfer.model_dump_json(),
        "--runtime-json", runtime.model_dump_json(),
        "--parent-pid", str(parent_pid),
    ]


class Launcher(ABC):
    """Starts and stops node agents."""

    @abstractmethod
    async def start(self, nodes: list[int], controller: tuple[str, int]) -> None:
        """Start one agent per node id, each told to register at ``controller``."""

    @abstractmethod
    def pids(self) -> dict[int, int]:
        """Process id of each agent started (for fault injection and orphan checks)."""

    @abstractmethod
    def kill(self, node: int) -> None:
        """SIGKILL one agent (fault injection)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every agent and wait for them; idempotent."""


class LocalLauncher(Launcher):
    """Spawns agents as child processes of this one."""

    def __init__(self, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None,
                 stderr_path: str | None = None) -> None:
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        self.procs: dict[int, subprocess.Popen] = {}
        self._stderr = open(stderr_path, "ab") if stderr_path else None

    async def start(self, nodes: list[int], controller: tuple[str, int]) -> None:
        me = os.getpid()
        env = dict(os.environ)
        env.setdefault("UCX_TLS", "cma,self,tcp")
        for n in nodes:
            self.procs[n] = subprocess.Popen(
                agent_command(n, controller, self.transfer, self.runtime, me),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
                # Own session: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches the
                # launcher only, which stops its agents cleanly; they still die with it (PDEATHSIG).
                start_new_session=True,
            )

    def pids(self) -> dict[int, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def kill(self, node: int) -> None:
        p = self.procs[node]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)

    async def stop(self, grace_s: float = 3.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = asyncio.get_running_loop().time() + grace_s
        for p in self.procs.values():
            while p.poll() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            if p.poll() is None:
                p.kill()
                p.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def make_launcher(transfer: TransferSettings, runtime: RuntimeSettings) -> Launcher:
    if runtime.launcher == "local":
        return LocalLauncher(transfer, runtime)
    from lambdascale.runtime.ray_launcher import RayLauncher

    return RayLauncher(transfer, runtime)


class LocalCluster:
    """A controller-side :class:`Cluster` plus launched agents, as one async context manager.

    ``async with LocalCluster(4) as lc: lc.cluster.request(...)``; agents are stopped on exit,
    even when the body raises.
    """

    def __init__(self, n_nodes: int, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None,
                 launcher: Launcher | None = None) -> None:
        from lambdascale.runtime.cluster import Cluster

        self.n_nodes = n_nodes
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        self.cluster = Cluster(self.runtime)
        self.launcher = launcher or make_launcher(self.transfer, self.runtime)

    async def __aenter__(self) -> "LocalCluster":
        addr = await self.cluster.start()
        nodes = list(range(self.n_nodes))
        try:
            await self.launcher.start(nodes, addr)
            await self.cluster.wait_for_agents(nodes)
        except BaseException:
            await self.launcher.stop()
            await self.cluster.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cluster.close()
        await self.launcher.stop()
