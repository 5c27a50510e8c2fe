"""Ray launcher: one node agent per Ray node, placed by a custom resource.

Every Ray node that may host an agent advertises ``runtime.ray_resource`` (default
``lambdascale_node``) with capacity 1 (``ray start --resources '{"lambdascale_node": 1}'``); each
agent is hosted by a tiny actor that asks for one unit, so Ray puts exactly one agent per node.
Ray carries control only (starting and stopping the agent process): the agent dials the
controller itself, and weights move over the transport, never through Ray's object store.

Agents die with the controller: the hosting actor is owned by the driver (not detached), so Ray
kills it when the driver exits; the agent is the actor's child armed with ``PR_SET_PDEATHSIG``
and it also exits when no controller answers it.

Agents come back (``runtime.respawn``): the actor restarts an agent process that died, with the
local launcher's capped backoff, and Ray restarts the actor itself (``max_restarts=-1``), whose
constructor starts the agent again; either way the new process registers as the node's next
incarnation. :meth:`RayLauncher.restarts` counts the first kind per node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from typing import Any

from lambdascale.membership import respawn_delay_s
from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.ray_connect import connect, import_ray, wait_for_slots
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import SECRET_ENV
from lambdascale.transfer.settings import TransferSettings


class _AgentHost:
    """Ray actor body: runs one agent process on its node and restarts it when it dies.

    The agent starts in the constructor, so when Ray restarts the actor itself (its worker died:
    the actor is created with ``max_restarts=-1`` under ``runtime.respawn``) the agent comes back
    with it. Inside a live actor a supervisor thread restarts an agent that died (any exit but a
    clean one) after the local launcher's capped exponential backoff
    (:func:`lambdascale.membership.respawn_delay_s`); the new process registers as the node's next
    incarnation.
    """

    def __init__(self, node: int, controller: tuple[str, int], transfer_json: str, runtime_json: str,
                 secret_hex: str) -> None:
        self.runtime = RuntimeSettings.model_validate_json(runtime_json)
        self._argv = agent_command(node, controller, TransferSettings.model_validate_json(transfer_json),
                                   self.runtime, os.getpid())
        self._env = dict(os.environ)
        self._env.setdefault("UCX_TLS", "cma,self,tcp")
        self._env[SECRET_ENV] = secret_hex  # in the agent's environment, never its argv
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.restarts = 0
        self.proc = self._spawn()
        if self.runtime.respawn:
            threading.Thread(target=self._supervise, name=f"agent-{node}-supervisor", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        self._started = time.monotonic()
        return subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self._env)

    def _supervise(self) -> None:
        rt = self.runtime
        failures = 0
        while not self._stopping.is_set():
            rc = self.proc.wait()
            if self._stopping.is_set() or rc == 0:
                return  # stopped on purpose, or a clean exit (its controller shut it down)
            ran = time.monotonic() - self._started
            failures = 1 if ran >= rt.respawn_reset_s else failures + 1
            if self._stopping.wait(respawn_delay_s(failures, rt.respawn_backoff_s, rt.respawn_backoff_max_s)):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._spawn()
                self.restarts += 1

    def pid(self) -> int:
        return self.proc.pid

    def restart_count(self) -> int:
        return self.restarts

    def signal(self, sig: int) -> None:
        with self._lock:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            p = self.proc
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a paused agent cannot act on SIGTERM
            p.terminate()
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
        host_cls = ray.remote(num_cpus=0, resources={res: 1},
                              max_restarts=-1 if self.runtime.respawn else 0)(_AgentHost)
        # the secret travels as an actor-creation argument over Ray's own channels (kept by Ray's
        # GCS to restart the actor: the cluster's token auth protects it), never on a command line
        for n in nodes:
            self.actors[n] = host_cls.remote(n, controller, self.transfer.model_dump_json(),
                                             self.runtime.model_dump_json(), secret.hex())
        pids = await asyncio.to_thread(ray.get, [self.actors[n].pid.remote() for n in nodes],
                                       timeout=self.runtime.register_timeout_s)
        self._pids.update(zip(nodes, pids))

    def pids(self) -> dict[int, int]:
        """Each agent's current process id (a restarted agent has a new one)."""
        if not self.actors:
            return dict(self._pids)
        ray = import_ray()
        nodes = list(self.actors)
        self._pids.update(zip(nodes, ray.get([self.actors[n].pid.remote() for n in nodes], timeout=30)))
        return dict(self._pids)

    def restarts(self) -> dict[int, int]:
        if not self.actors:
            return {}
        ray = import_ray()
        nodes = list(self.actors)
        return {n: c for n, c in zip(nodes, ray.get([self.actors[n].restart_count.remote() for n in nodes],
                                                    timeout=30)) if c}

    def kill(self, node: int) -> None:
        ray = import_ray()
        ray.get(self.actors[node].kill.remote())

    def signal(self, node: int, sig: int) -> None:
        ray = import_ray()
        ray.get(self.actors[node].signal.remote(sig))

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
