"""Ray nodes started the way the README tells a user to (``ray start``), each one process group
this harness kills and reaps on exit, never a host-wide ``ray stop`` (it would take other Ray
users of the machine with it).

Every node gets its own short ``--temp-dir`` (unix socket paths are limited to 107 bytes, and
nodes on one machine must not share socket names). ``ray_home`` is a home directory holding a
token made by ``ray get-auth-token --generate``: with it in ``HOME``, ``ray start`` turns on
token authentication by itself, as it does for a user who once generated a token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


def ray_cli() -> str:
    """The ``ray`` command of this interpreter's environment (skip when Ray is not installed)."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'lambdascale[ray]')")
    exe = Path(sys.executable).parent / "ray"
    if not exe.exists():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    return str(exe)


def ray_env(home: Path) -> dict[str, str]:
    """This process's environment with ``HOME`` at ``home`` and no Ray auth settings of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def ray_home(root: Path, token: bool = True) -> Path:
    """A home directory for Ray processes; with ``token``, ``~/.ray/auth_token`` made by Ray itself."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    if token:
        r = subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=ray_env(home), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and (home / ".ray" / "auth_token").is_file(), r.stderr
    return home


@contextlib.contextmanager
def ray_node(env: dict[str, str], *, head_port: int | None = None, address: str | None = None, ip: str,
             resources: dict[str, float], prefix: list[str] | None = None) -> Iterator[subprocess.Popen]:
    """One Ray node (``ray start --block``): a head on ``ip:head_port``, or a worker joining
    ``address``; ``prefix`` runs it elsewhere (``ip netns exec NS``). Killed with its process
    group on exit, its temp dir removed."""
    tmp = tempfile.mkdtemp(prefix="lsr", dir="/tmp")
    argv = [ray_cli(), "start", "--block", "--node-ip-address", ip, "--resources", json.dumps(resources),
            "--num-cpus", "1", "--object-store-memory", str(80 << 20), "--temp-dir", tmp, "--disable-usage-stats"]
    argv += ["--head", "--port", str(head_port), "--include-dashboard", "false"] if head_port else ["--address", str(address)]
    proc = subprocess.Popen((prefix or []) + argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived the node's own shutdown
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Block until ``host:port`` accepts a connection (``proc`` must stay alive meanwhile)."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the Ray node exited with {proc.returncode} before listening on {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)  # polling a port that a separate process is about to open
    raise AssertionError(f"nothing listened on {host}:{port} within {timeout_s}s")
