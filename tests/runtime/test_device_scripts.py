"""bench/device scripts on CPU: the scale-out and multicast scripts' --smoke modes, --dry-run, and the run-all driver."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "device" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaleout_smoke_runs_on_cpu_and_is_exact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    assert _load("scaleout").main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["all_exact"] is True and r["nodes"] == 3 and r["finished"] is True
    (row,) = r["systems"]
    assert row["system"] == "lambdascale" and row["exact"] is True and row["mismatched_requests"] == []
    assert row["bytes_moved"] == 2 * r["model_bytes"]  # every byte of the model reached both receivers once
    assert "lambdascale" in capsys.readouterr().out


def test_run_all_runs_scripts_within_budget_and_writes_results(tmp_path: Path) -> None:
    run_all = _load("run_all")
    assert set(run_all.SCRIPTS) >= {"load_and_ewl", "scaleout"}
    assert run_all.main(["--smoke", "--only", "load_and_ewl", "--out", str(tmp_path), "--budget-s", "120"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["load_and_ewl"]["rc"] == 0 and summary["load_and_ewl"]["timed_out"] is False
    assert json.loads((tmp_path / "load_and_ewl.json").read_text())["tokens_match"] is True
    assert "--smoke" in (tmp_path / "load_and_ewl.log").read_text()


def test_run_all_times_out_a_script_and_rejects_bad_input(tmp_path: Path, capsys) -> None:
    run_all = _load("run_all")
    # a budget too short to start anything: the script is skipped, not hung on
    assert run_all.main(["--smoke", "--only", "load_and_ewl", "--out", str(tmp_path), "--budget-s", "1"]) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["load_and_ewl"]["skipped"] == "budget spent"
    assert run_all.main(["--only", "nope"]) == 2
    assert "unknown scripts ['nope']" in capsys.readouterr().err


def test_run_all_check_accepts_every_full_run_and_dry_run_rejects_bad_arguments(capsys) -> None:
    # the device session runs the full-run arguments blind: a typo there (8 blocks of a 4-layer
    # model, once) must show up here, on CPU, in seconds
    assert _load("run_all").main(["--check"]) == 0
    assert "all accepted" in capsys.readouterr().out
    scaleout, ewl = _load("scaleout"), _load("load_and_ewl")
    assert scaleout.main(["--dry-run", "--model", "synthetic:llama2-7b", "--layers", "4", "--blocks", "8"]) == 2
    assert "--blocks 8 must be in [1, 4]" in capsys.readouterr().err
    assert scaleout.main(["--dry-run", "--systems", "lambdascale,ring"]) == 2
    assert "unknown ['ring']" in capsys.readouterr().err
    assert scaleout.main(["--dry-run", "--nodes", "2", "--sources", "2"]) == 2
    assert scaleout.main(["--dry-run", "--model", "synthetic:no-such-shape"]) == 2
    assert scaleout.main(["--dry-run", "--layers", "0"]) == 2
    assert "--layers must be at least 1" in capsys.readouterr().err
    assert scaleout.main(["--dry-run", "--systems", "lambdascale-lend", "--helper-blocks", "-1"]) == 2
    assert "--helper-blocks must be >= 0" in capsys.readouterr().err
    assert scaleout.main(["--dry-run", "--systems", "lambdascale,lambdascale-lend"]) == 0
    assert ewl.main(["--dry-run", "--shape", "tiny-llama", "--blocks", "9"]) == 2
    assert ewl.main(["--dry-run", "--shape", "tiny-llama", "--blocks", "8"]) == 0


def test_multicast_script_smoke_measures_each_receiver_against_point_to_point(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    mc = _load("multicast")
    assert mc.main(["--smoke", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["receivers"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["p2p_gbps"] > 0 and len(row["receiver_gbps"]) == row["receivers"]
        assert row["efficiency"] == pytest.approx(sum(row["receiver_gbps"]) / row["receivers"] / row["p2p_gbps"])
    assert r["capped"]["sources"] == 2 and r["capped"]["bound_s"] > 0 and "wall_s" in r
    assert mc.main(["--dry-run", "--receivers", "1,x"]) == 2
    assert "comma list of integers" in capsys.readouterr().err
