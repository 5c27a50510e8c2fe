"""What every launcher is: the :class:`Launcher` interface and the argv that starts one agent.

The implementations (:mod:`lambdascale.runtime.local_launcher`,
:mod:`lambdascale.runtime.ray_launcher`) import this module; the factory that picks one,
:func:`lambdascale.runtime.launcher.make_launcher`, sits above them all, so no launcher module
imports another.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod

from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings


def agent_command(
    node: int, controller: tuple[str, int], transfer: TransferSettings, runtime: RuntimeSettings, parent_pid: int
) -> list[str]:
    """argv that starts one agent (shared by the launchers): ``python -m lambdascale.runtime.agent``."""
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
    async def start(self, nodes: list[int], controller: tuple[str, int], secret: bytes) -> None:
        """Start one agent per node id, each told to register at ``controller`` and given the cluster
        ``secret`` in its environment (:data:`~lambdascale.transfer.auth.SECRET_ENV`), never in its
        argv: a command line is visible to every user of the host (``ps``)."""

    @abstractmethod
    def pids(self) -> dict[int, int]:
        """Process id of each agent started (for fault injection and orphan checks)."""

    def restarts(self) -> dict[int, int]:
        """Times each node's agent was restarted after it died (launchers that supervise count them)."""
        return {}

    def signal(self, node: int, sig: int) -> None:
        """Send a signal to one agent (fault injection); launchers that own no process refuse."""
        raise NotImplementedError(f"{type(self).__name__} cannot signal node {node}'s agent")

    @abstractmethod
    def kill(self, node: int) -> None:
        """SIGKILL one agent (fault injection)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every agent and wait for them; idempotent."""
