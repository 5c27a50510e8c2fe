"""Ctrl-C of a real ``lambdascale serve`` over node agents: the terminal's SIGINT goes to the whole
foreground process group; the gateway shuts down cleanly, no agent prints a KeyboardInterrupt
traceback, and no process is left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _agents_of(parent: int) -> list[int]:
    """Pids of live agent processes whose launcher is ``parent`` (from /proc cmdlines)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (b"lambdascale.runtime.agent" in argv and b"--parent-pid" in argv and state != "Z"
                and argv[argv.index(b"--parent-pid") + 1] == str(parent).encode()):
            pids.append(int(d.name))
    return pids


def test_ctrl_c_of_serve_stops_agents_without_tracebacks(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path / "models", n_blocks=2, chunks_per_block=1)
    cmd = [sys.executable, "-m", "lambdascale.cli", "serve", "--backend", "cluster", "--nodes", "2", "--port", "0",
           "--model", ck.dir.name, "--models-dir", str(tmp_path / "models"),
           "--registry-path", str(tmp_path / "reg.sqlite")]
    # Its own session, like a shell job: killpg below is what a terminal's Ctrl-C does.
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url is not None, "serve did not print its URL:\n" + "".join(seen)
        r = httpx.post(url + "/v1/completions", timeout=120,
                       json={"model": ck.dir.name, "prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text  # an agent formed a stage (torch imported and running)
        agents = _agents_of(proc.pid)
        assert len(agents) == 2, agents
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(seen) + out
    assert proc.returncode == 0, text
    assert "stopped cleanly" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    deadline = time.monotonic() + 10  # PDEATHSIG/EOF exits are asynchronous to the launcher's exit
    while _agents_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _agents_of(proc.pid) == []


def test_serve_handler_runs_while_the_stop_lock_is_held(tmp_path: Path) -> None:
    """Python runs a signal handler on the main thread, possibly inside ``stop.wait`` where that
    event's lock is held. ``lambdascale serve``'s handler must then return at once, and the serve
    loop still stop: a handler that called ``stop.set()`` waited for the lock forever (Ctrl-C hung
    ``lambdascale serve`` now and then). The handler serve installs is called with the lock held."""
    import io
    import threading

    from lambdascale.config import load_config
    from lambdascale.serve.launch import serve_forever

    cfg = load_config(None, {"serve.backend": "fake", "serve.port": 0,
                             "serve.registry_path": str(tmp_path / "reg.sqlite"), "paths.runs_dir": str(tmp_path)})
    out, stop, checked = io.StringIO(), threading.Event(), []
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while "Ctrl-C to stop" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        handler = signal.getsignal(signal.SIGINT)
        with stop._cond:  # type: ignore[attr-defined]
            t = threading.Thread(target=handler, args=(signal.SIGINT, None), daemon=True)
            t.start()
            t.join(5)
            checked.append(not t.is_alive())
        if not checked[0]:
            stop.set()  # unblock the old handler so the test ends

    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    try:
        assert serve_forever(cfg, out=out, stop=stop) == 0
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    helper.join(10)
    assert checked == [True] and not stop.is_set()  # the handler returned; the loop stopped on its flag
    assert "stopped cleanly" in out.getvalue()
