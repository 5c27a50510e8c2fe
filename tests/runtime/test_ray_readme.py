"""The Ray path as the README tells it, with the Ray that ``.[ray]`` installs: ``ray start --head
--node-ip-address 127.0.0.1 --port P --resources '{"lambdascale_node": N}'`` on a machine that holds
a Ray token (so the head runs with token authentication, as Ray 2.5x+ decides by itself), then
``lambdascale serve --launcher ray --address 127.0.0.1:P --nodes N`` with no Ray setting of its
own: it joins, serves the demo model, and its greedy answer is a single engine's. Without the
token the gateway refuses to start with one line that says what to set."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.multihost.netns import free_port
from tests.multihost.raynodes import ray_env, ray_home, ray_node, wait_for_port

pytestmark = pytest.mark.ray
PROMPT = "The capital of France is"


def _serve(env: dict[str, str], address: str, nodes: int, models_dir: Path, tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lambdascale.cli", "serve", "--launcher", "ray", "--address", address,
           "--nodes", str(nodes), "--port", "0", "--models-dir", str(models_dir), "--model", "smollm2-135m",
           "--registry-path", str(tmp / "reg.sqlite")]
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def _url_or_exit(proc: subprocess.Popen, timeout_s: float) -> tuple[str | None, str]:
    """The URL ``serve`` prints once it serves, or None when it exits first; with its output so far."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)", line):
            return m.group(1), "".join(seen)
    return None, "".join(seen)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def expected_greedy(models_dir: Path, n_tokens: int) -> tuple[list[int], str]:
    """(prompt ids, a single engine's greedy text) for PROMPT on the demo model."""
    from lambdascale.model.checkpoint import find_model
    from lambdascale.model.tokenizer import Tokenizer
    from tests.serve.cluster_helpers import greedy_ids

    d = find_model(models_dir, "smollm2-135m").dir
    tok = Tokenizer.from_dir(d / "tokenizer")
    ids = tok.encode(PROMPT)
    return ids, tok.decode(greedy_ids(d, ids, n_tokens))


def demo_greedy_text(url: str, ids: list[int], n_tokens: int) -> str:
    """The gateway's greedy completion of ``ids`` on the demo model (asserts a 200)."""
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "smollm2-135m", "prompt": ids, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_the_readme_ray_commands_serve_with_token_auth(tmp_path: Path, demo_model_dir: Path) -> None:
    home = ray_home(tmp_path)  # ~/.ray/auth_token exists: `ray start` turns token auth on
    env = ray_env(home)
    port = free_port("127.0.0.1")
    ids, want = expected_greedy(demo_model_dir, 12)
    with ray_node(env, head_port=port, ip="127.0.0.1", resources={"lambdascale_node": 2}) as head:
        wait_for_port("127.0.0.1", port, head)
        # a driver with neither the token nor RAY_AUTH_MODE: refused at once, in one line
        bare = ray_env(tmp_path / "elsewhere")
        (tmp_path / "elsewhere").mkdir()
        refused = _serve(bare, f"127.0.0.1:{port}", 2, demo_model_dir, tmp_path)
        url, out = _url_or_exit(refused, 120)
        out += _stop(refused)
        assert url is None and refused.returncode != 0, out
        assert "Traceback" not in out, out
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "RAY_AUTH_MODE=token" in errors[0] and f"127.0.0.1:{port}" in errors[0], out
        # the README's command, as written: it finds the token and joins
        proc = _serve(env, f"127.0.0.1:{port}", 2, demo_model_dir, tmp_path)
        try:
            url, out = _url_or_exit(proc, 240)
            assert url is not None, out + _stop(proc)
            assert demo_greedy_text(url, ids, 12) == want and "Paris" in want
        finally:
            out += _stop(proc)
    assert "token authentication" in out, out
