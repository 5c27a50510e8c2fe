"""``lambdascale serve`` as a real process (Ctrl-C shuts it down cleanly) and the admin CLI against it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lambdascale.cli import main


def start_serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "lambdascale.cli", "serve", "--backend", "fake", "--port", "0",
           "--registry-path", str(tmp_path / "reg.sqlite"), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise AssertionError("serve did not print its URL:\n" + "".join(seen))


def stop_serve(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def test_serve_deploy_status_and_restart(tmp_path, capsys) -> None:
    proc, url = start_serve(tmp_path, "--model", "alpha", "--admin-api-key", "adm-KEY-789")
    try:
        assert httpx.get(url + "/health").json()["models"] == ["alpha"]
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 401  # keys configured: inference needs one too
        key = ["--url", url, "--api-key", "adm-KEY-789"]
        assert main(["deploy", "beta", "--max-instances", "3", "--tier", "gpu", *key]) == 0
        assert main(["update", "beta", "--min-instances", "1", *key]) == 0
        assert main(["deploy", "beta", *key]) == 2            # already deployed: clear error, no traceback
        assert main(["delete", "nope", *key]) == 2
        assert main(["deploy", "gamma", "--url", url, "--api-key", "wrong"]) == 2
        assert main(["status", *key]) == 0
        out = capsys.readouterr()
        assert "deployed beta" in out.out and "updated beta" in out.out and "min_instances=1" in out.out
        assert "already deployed" in out.err and "401" in out.err
        assert "node-0" in out.out and "beta" in out.out and "gpu" in out.out
    finally:
        log = stop_serve(proc)
    assert "stopped cleanly" in log
    assert "adm-KEY-789" not in log  # keys never logged
    assert "adm-KEY-789" not in (tmp_path / "runs" / "serve" / "config.yaml").read_text()
    # Restart over the same registry: both registrations survive.
    proc, url = start_serve(tmp_path)
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["alpha", "beta"]
        assert main(["status", "--json", "--url", url]) == 0
        assert '"max_instances": 3' in capsys.readouterr().out
    finally:
        stop_serve(proc)


def test_admin_cli_reports_unreachable_gateway(capsys) -> None:
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the gateway" in capsys.readouterr().err
    assert main(["update", "x", "--url", "http://127.0.0.1:9"]) == 2
    assert "nothing to update" in capsys.readouterr().err
