"""Ray launcher: one node agent per Ray node, placed by a custom resource.

Every Ray node that may host an agent advertises ``runtime.ray_resource`` (default
``lambdascale_node``) with capacity 1 (``ray start --resources '{"lambdascale_node": 1}'``); each
agent is hosted by a tiny actor that asks for one unit, so Ray puts exactly one agent per node.
Ray carries control only (starting and stopping the agent process): the agent dials the
controller itself, and weights move over the transport, never through Ray's object store.

Agents die with the controller: the hosting actor is owned by the driver (not detached), so Ray
kills it when the driver exits; the agent is the actor's child armed with ``PR_SET_PDEATHSIG``
and it also exits when its control channel to the controller closes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any

from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.ray_connect import connect, import_ray, wait_for_slots
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import SECRET_ENV
from lambdascale.transfer.settings import TransferSettings


class _AgentHost:
    """Ray actor body: starts one agent process on its node and stops it on request."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, node: int, controller: tuple[str, int], transfer_json: str, runtime_json: str,
              secret_hex: str) -> int:
        argv = agent_command(
            node, controller, TransferSettings.model_validate_json(transfer_json),
            RuntimeSettings.model_validate_json(runtime_json), os.getpid(),
        )
        env = dict(os.environ)
        env.setdefault("UCX_TLS", "cma,self,tcp")
        env[SECRET_ENV] = secret_hex  # in the agent's environment, never its argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RayLauncher(Launcher):
    """Places agents on a Ray cluster (``runtime.address``, or the one this process joined)."""

    def __init__(self, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None) -> None:
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        self.actors: dict[int, Any] = {}
        self._pids: dict[int, int] = {}

    async def start(self, nodes: list[int], controller: tuple[str, int], secret: bytes) -> None:
        # token auth and a one-line error when the cluster is not there or refuses us (ray_connect)
        ray = await asyncio.to_thread(connect, self.runtime.address)
        res = self.runtime.ray_resource
        await wait_for_slots(ray, res, len(nodes), self.runtime.register_timeout_s)
        host_cls = ray.remote(num_cpus=0, resources={res: 1})(_AgentHost)
        for n in nodes:
            self.actors[n] = host_cls.remote()
        # the secret travels as an actor-call argument over Ray's own channels (the driver's
        # connection to the cluster), never on a command line
        refs = [self.actors[n].start.remote(n, controller, self.transfer.model_dump_json(), self.runtime.model_dump_json(),
                                            secret.hex())
                for n in nodes]
        pids = await asyncio.to_thread(ray.get, refs, timeout=self.runtime.register_timeout_s)
        self._pids.update(zip(nodes, pids))

    def pids(self) -> dict[int, int]:
        return dict(self._pids)

    def kill(self, node: int) -> None:
        ray = import_ray()
        ray.get(self.actors[node].kill.remote())

    async def stop(self) -> None:
        if not self.actors:
            return
        ray = import_ray()
        try:
            await asyncio.to_thread(ray.get, [a.stop.remote() for a in self.actors.values()], timeout=10)
        finally:
            for a in self.actors.values():
                ray.kill(a)
            self.actors.clear()
