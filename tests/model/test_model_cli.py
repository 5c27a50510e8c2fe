"""``lambdascale import`` / ``lambdascale models`` through the real dispatcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.cli import main
from lambdascale.model.checkpoint import find_model


def test_import_then_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["import", "synthetic:tiny-qwen2", "--models-dir", str(tmp_path), "--blocks", "2",
               "--chunks-per-block", "3", "--quiet", "--name", "q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "q:" in out and "2 blocks, 6 chunks, float32" in out
    ck = find_model(tmp_path, "q")
    assert ck.manifest.n_chunks == 6 and ck.arch.family.value == "qwen2"
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "q " in out and " 6 " in out and "qwen2" in out


def test_models_env_var_and_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LAMBDASCALE_MODELS", str(tmp_path / "env-models"))
    assert main(["models"]) == 0
    assert "no models in" in capsys.readouterr().out
    assert main(["import", "synthetic:tiny-llama", "--layers", "2", "--quiet"]) == 0
    assert (tmp_path / "env-models" / "synthetic-tiny-llama-2l" / "manifest.json").is_file()


def test_bad_input_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "synthetic:nope", "--models-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model shape 'nope'") and "Traceback" not in err
    assert main(["import", str(tmp_path / "missing-dir"), "--models-dir", str(tmp_path), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_broken_model_is_listed_as_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    assert "BROKEN" in capsys.readouterr().out


def test_config_file_sets_default_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store:\n  n_blocks: 3\n  chunks_per_block: 1\n")
    assert main(["import", "synthetic:tiny-llama", "--models-dir", str(tmp_path / "m"), "--config", str(cfg), "--quiet"]) == 0
    m = find_model(tmp_path / "m", "synthetic-tiny-llama").manifest
    assert (m.n_blocks, m.n_chunks) == (3, 3)
