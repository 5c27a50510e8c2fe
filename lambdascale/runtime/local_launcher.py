"""The embedded default launcher: N agent processes on this machine, children of this one.

Each agent is armed three ways against orphaning: ``PR_SET_PDEATHSIG`` (SIGKILL when the
launcher's process dies), a parent-pid check every heartbeat, and exit on control-channel EOF.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import SECRET_ENV
from lambdascale.transfer.settings import TransferSettings


class LocalLauncher(Launcher):
    """Spawns agents as child processes of this one."""

    def __init__(self, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None,
                 stderr_path: str | None = None) -> None:
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        self.procs: dict[int, subprocess.Popen] = {}
        self._stderr = open(stderr_path, "ab") if stderr_path else None

    async def start(self, nodes: list[int], controller: tuple[str, int], secret: bytes) -> None:
        me = os.getpid()
        env = dict(os.environ)
        env.setdefault("UCX_TLS", "cma,self,tcp")
        env[SECRET_ENV] = secret.hex()  # the agent takes it out of its environment at start
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
