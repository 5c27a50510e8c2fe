"""The GPU script's --smoke mode runs on CPU: same code path, tiny shape, tokens must match."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_load_and_ewl_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("load_and_ewl", REPO / "bench" / "device" / "load_and_ewl.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens_match"] is True and len(r["tokens"]) == 4 and r["bytes"] > 0
    assert r["ours_gbps"] > 0 and r["ewl_ttft_s"] > 0
