"""An agent whose controller is not there retries, then names the address it tried and why."""

from __future__ import annotations

import socket
import subprocess
import sys

from lambdascale.runtime.settings import RuntimeSettings


def test_an_agent_that_cannot_reach_its_controller_says_where_and_why(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o600)
    runtime = RuntimeSettings(register_timeout_s=0.5)
    # the config file carries the short register timeout (what a supervisor's unit would point at)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"runtime:\n  register_timeout_s: {runtime.register_timeout_s}\n")
    r = subprocess.run([sys.executable, "-m", "lambdascale.cli", "agent", "--controller", f"127.0.0.1:{port}",
                        "--node", "0", "--config", str(cfg), "--token-file", str(secret)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot reach the controller at 127.0.0.1:{port}" in r.stderr and "refused" in r.stderr.lower()
    assert "retrying" in r.stderr  # it tried more than once before giving up
