"""Config tree, clock and architecture registry."""

from __future__ import annotations

import json

import pytest

from lambdascale.model.families import arch_from_hf_config, hf_config
from lambdascale.clock import ManualClock
from lambdascale.config import ConfigError, LambdaScaleConfig, describe_config, dump_config, load_config
from lambdascale.model.arch import SHAPES, ModelArch, get_shape, plan_blocks


def test_defaults_validate_and_every_field_is_documented() -> None:
    cfg = LambdaScaleConfig()
    assert cfg.control.autoscale_interval_s == 0.5
    for name, _default, doc in describe_config():
        assert doc, f"config field {name} has no documentation"


def test_bad_config_value_names_the_field(tmp_path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"runtime": {"nodes": 0}}))
    with pytest.raises(ConfigError, match=r"runtime\.nodes"):
        load_config(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown_section|Extra inputs"):
        load_config(None, {"unknown_section.x": 1})


def test_every_command_reports_bad_config_as_an_error_not_a_traceback(tmp_path, capsys) -> None:
    from lambdascale.cli import main

    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "error: cannot read config file" in capsys.readouterr().err
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"runtime": {"nodes": 0}}))
    assert main(["generate", "m", "hi", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {p}" in err and "runtime.nodes" in err
    for cmd in (["bench", "scale"], ["serve"]):
        assert main([*cmd, "--pipeline-helper-blocks", "-1"]) == 2
        err = capsys.readouterr().err
        assert "invalid configuration in command-line flags" in err and "runtime.pipeline_helper_blocks" in err


def test_config_round_trips_through_dump(tmp_path) -> None:
    cfg = load_config(None, {"runtime.nodes": 6, "store.keep_alive_s": 3})
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg


def test_manual_clock_never_goes_back() -> None:
    c = ManualClock(1.0)
    c.advance(0.5)
    assert c.now() == 1.5
    with pytest.raises(ValueError):
        c.advance(-1)
    with pytest.raises(ValueError):
        c.set(1.0)


def test_known_shapes_have_published_sizes() -> None:
    # Parameter counts of the published models (billions), to 2%.
    expected = {"qwen2-0.5b": 0.494, "llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98, "llama3-8b": 8.03, "smollm2-135m": 0.1349}
    for name, billions in expected.items():
        got = get_shape(name).total_params() / 1e9
        assert got == pytest.approx(billions, rel=0.02), name
    with pytest.raises(ValueError, match="known shapes"):
        get_shape("gpt-17")


def test_hf_config_round_trip_and_unsupported_family() -> None:
    for arch in SHAPES.values():
        if arch.moe is None and arch.family.value in ("llama", "qwen2", "mistral"):
            assert arch_from_hf_config(hf_config(arch)) == arch
    with pytest.raises(ValueError, match="unsupported architecture"):
        arch_from_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize("layers,blocks", [(30, 8), (32, 8), (8, 8), (5, 2)])
def test_plan_blocks_is_contiguous_and_balanced(layers: int, blocks: int) -> None:
    plan = plan_blocks(layers, blocks)
    assert plan[0][0] == 0 and plan[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    sizes = [e - s for s, e in plan]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        plan_blocks(4, 5)
