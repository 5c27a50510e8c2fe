"""Agents on hosts of one's own: nothing to launch, a supervisor (systemd, a Kubernetes
DaemonSet) starts ``lambdascale agent --controller HOST:PORT --node N`` on each host and restarts
it when it dies (docs/deploy.md). The controller accepts the nodes that register."""

from __future__ import annotations

import logging

from lambdascale.errors import LambdaScaleError
from lambdascale.runtime.launcher_base import Launcher

log = logging.getLogger(__name__)


class ExternalLauncher(Launcher):
    """Waits for supervised agents; it owns no process, so it can neither kill nor stop one."""

    def __init__(self) -> None:
        self._nodes: list[int] = []

    async def start(self, nodes: list[int], controller: tuple[str, int], secret: bytes) -> None:
        # the secret is not handed out here: each supervised agent reads runtime.secret_file's
        # copy from its --token-file
        self._nodes = list(nodes)
        log.info("waiting for %d agent(s) (nodes %s) to register at %s:%d: run `lambdascale agent --controller "
                 "%s:%d --node N` on each host", len(nodes), nodes, *controller, *controller)

    def pids(self) -> dict[int, int]:
        return {}

    def kill(self, node: int) -> None:
        raise LambdaScaleError(f"node {node} runs under its own supervisor (runtime.launcher = external): "
                               "stop it there")

    async def stop(self) -> None:
        """Nothing to stop: when the controller closes, each agent's control channel ends and the
        agent dials again for ``runtime.register_timeout_s`` (a gateway restarting gets its nodes
        back as new incarnations), then exits and its supervisor decides whether to start it again."""
