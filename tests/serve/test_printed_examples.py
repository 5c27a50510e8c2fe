"""The curl and openai lines that ``lambdascale serve`` prints run verbatim in a shell (README's main job)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdascale.serve import launch


def test_openai_example_installs_the_sdk_first_when_missing(monkeypatch) -> None:
    line = launch.openai_example("http://127.0.0.1:9", "m", "none")
    assert line.startswith(sys.executable) and "pip install" not in line  # openai is a dev dependency here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    line = launch.openai_example("http://127.0.0.1:9", "m", "none")
    assert line.startswith(f"{sys.executable} -m pip install -q openai && {sys.executable} -c ")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_printed_curl_and_openai_examples_work_verbatim(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lambdascale.cli", "serve", "--backend", "fake", "--port", "0",
           "--model", "demo", "--registry-path", str(tmp_path / "reg.sqlite")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("import openai" in s for s in seen):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        curl = next((s.strip() for s in seen if s.strip().startswith("curl ")), None)
        py = next((s.strip() for s in seen if "import openai" in s), None)
        assert curl and py, "serve did not print both examples:\n" + "".join(seen)
        assert re.search(r"at http://127\.0\.0\.1:\d+", "".join(seen))
        r = subprocess.run(["bash", "-c", curl + " -s"], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        r = subprocess.run(["bash", "-c", py], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == body["choices"][0]["message"]["content"].strip()  # fake tokens: deterministic
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_registered_demo_model_is_imported_when_the_models_dir_lacks_it(tmp_path: Path, monkeypatch) -> None:
    import io

    from lambdascale.config import load_config
    from lambdascale.model import importers
    from lambdascale.serve.registry import ModelRegistry
    from lambdascale.serve.schemas import DeploySpec

    calls: list[tuple[str, Path]] = []
    monkeypatch.setattr(importers, "import_model", lambda name, d: calls.append((name, Path(d))))
    cfg = load_config(None, {"paths.models_dir": str(tmp_path / "models"), "serve.backend": "cluster"})
    reg = ModelRegistry(tmp_path / "reg.sqlite")
    try:
        reg.put(DeploySpec(name=launch.DEMO_MODEL))  # kept from an earlier run; this models_dir is new
        reg.put(DeploySpec(name="other"))
        out = io.StringIO()
        assert sorted(launch.startup_models(cfg, reg, out)) == sorted([launch.DEMO_MODEL, "other"])
    finally:
        reg.close()
    assert calls == [(launch.DEMO_MODEL, tmp_path / "models")]  # only the demo: other models are the user's to import
    assert "importing the demo model" in out.getvalue()
