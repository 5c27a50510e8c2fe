"""The embedded default launcher: N agent processes on this machine, children of this one, and
their supervisor.

Each agent is armed three ways against orphaning: ``PR_SET_PDEATHSIG`` (SIGKILL when the
launcher's process dies), a parent-pid check every heartbeat, and exit when no controller answers.

Supervision (``runtime.respawn``): the launcher started its agents, so it restarts one that dies
(a crash, an OOM kill, ``kill -9``: any exit but a clean one) after a capped exponential backoff
(:func:`lambdascale.membership.respawn_delay_s`: ``respawn_backoff_s`` doubling per death in a row,
at most ``respawn_backoff_max_s``; an agent that ran ``respawn_reset_s`` starts over). The new
process registers as the node's next incarnation. :meth:`LocalLauncher.restarts` counts them per
node (``/metrics`` and ``lambdascale status`` show it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess

from lambdascale.membership import respawn_delay_s
from lambdascale.runtime.launcher_base import Launcher, agent_command
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.auth import SECRET_ENV
from lambdascale.transfer.settings import TransferSettings

log = logging.getLogger(__name__)

#: how often the supervisor looks at its children (a dead agent is restarted this much later at most,
#: on top of its backoff)
_WATCH_S = 0.1


class LocalLauncher(Launcher):
    """Spawns agents as child processes of this one and restarts those that die."""

    def __init__(self, transfer: TransferSettings | None = None, runtime: RuntimeSettings | None = None,
                 stderr_path: str | None = None) -> None:
        self.transfer = transfer or TransferSettings()
        self.runtime = runtime or RuntimeSettings()
        self.procs: dict[int, subprocess.Popen] = {}
        self._stderr = open(stderr_path, "ab") if stderr_path else None
        self._argv: dict[int, list[str]] = {}
        self._env: dict[str, str] = {}
        self._restarts: dict[int, int] = {}
        self._failures: dict[int, int] = {}   # deaths in a row (reset after respawn_reset_s of running)
        self._started_at: dict[int, float] = {}
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    async def start(self, nodes: list[int], controller: tuple[str, int], secret: bytes) -> None:
        me = os.getpid()
        env = dict(os.environ)
        env.setdefault("UCX_TLS", "cma,self,tcp")
        env[SECRET_ENV] = secret.hex()  # the agent takes it out of its environment at start
        self._env = env
        for n in nodes:
            self._argv[n] = agent_command(n, controller, self.transfer, self.runtime, me)
            self._spawn(n)
        if self.runtime.respawn and self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
            self._supervisor.add_done_callback(self._supervisor_done)

    def _spawn(self, n: int) -> None:
        self.procs[n] = subprocess.Popen(
            self._argv[n],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=self._env,
            # Own session: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches the
            # launcher only, which stops its agents cleanly; they still die with it (PDEATHSIG).
            start_new_session=True,
        )
        self._started_at[n] = asyncio.get_running_loop().time()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        due: dict[int, float] = {}  # node -> when its restart is due
        rt = self.runtime
        while not self._stopping:
            await asyncio.sleep(_WATCH_S)  # a poll of the children, not a wait standing in for an event
            now = loop.time()
            for n, p in list(self.procs.items()):
                if self._stopping or p.poll() is None or p.returncode == 0:
                    continue  # running, or it exited cleanly (Shutdown, its launcher gone): not a death
                if n not in due:
                    ran = now - self._started_at.get(n, now)
                    self._failures[n] = 1 if ran >= rt.respawn_reset_s else self._failures.get(n, 0) + 1
                    delay = respawn_delay_s(self._failures[n], rt.respawn_backoff_s, rt.respawn_backoff_max_s)
                    due[n] = now + delay
                    log.warning("agent of node %d (pid %d) exited with %s after %.1fs; restarting it in %.1fs",
                                n, p.pid, p.returncode, ran, delay)
                elif now >= due[n]:
                    del due[n]
                    self._spawn(n)
                    self._restarts[n] = self._restarts.get(n, 0) + 1
                    log.info("agent of node %d restarted (pid %d, restart %d)", n, self.procs[n].pid, self._restarts[n])

    def _supervisor_done(self, t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("agent supervisor failed: %r; dead agents are no longer restarted", t.exception(),
                      exc_info=t.exception())

    def pids(self) -> dict[int, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def restarts(self) -> dict[int, int]:
        return dict(self._restarts)

    def kill(self, node: int) -> None:
        p = self.procs[node]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)

    def signal(self, node: int, sig: int) -> None:
        """Send ``sig`` to one agent (fault injection: SIGSTOP / SIGCONT pause and continue it)."""
        p = self.procs[node]
        if p.poll() is None:
            p.send_signal(sig)

    async def stop(self, grace_s: float = 3.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a paused agent cannot act on SIGTERM
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
