"""``lambdascale plan``: text and the stable JSON document (docs/plan-json.md)."""

from __future__ import annotations

import argparse
import json

import pytest

from lambdascale.errors import LambdaScaleError
from lambdascale.pipe import cli as pipe_cli


def main(argv: list[str]) -> int:
    """Parse with only the ``plan`` subcommand registered (the top-level dispatcher imports every
    package's CLI; it turns a LambdaScaleError into exit code 2 plus the message)."""
    parser = argparse.ArgumentParser(prog="lambdascale")
    pipe_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_multicast_json_has_the_documented_fields(capsys) -> None:
    rc = main(["plan", "multicast", "--nodes", "8", "--sources", "2", "--blocks", "8", "--chunks", "16", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1 and doc["kind"] == "multicast" and doc["algo"] == "binomial"
    assert doc["sources"] == [0, 1] and doc["receivers"] == [2, 3, 4, 5, 6, 7]
    assert doc["all_blocks_tick"] == 9 and doc["completion_tick"] == 17
    assert doc["first_pipeline_tick"] == 9
    assert len(doc["rounds"]) == 17
    assert doc["rounds"][0][0] == [0, 2, 0, "network"]
    assert set(doc["node_full_tick"]) == {"2", "3", "4", "5", "6", "7"}
    assert doc["block_ticks"]["2"][0] <= 17


def test_plan_pipelines_text_and_player(capsys) -> None:
    rc = main(["plan", "pipelines", "--nodes", "8", "--sources", "2", "--chunk-mib", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "planned sizes [4, 2]" in out
    assert "tick    9: instances=2" in out and "form     n" in out
    assert "player" in out and "chunk:" in out
    # a ring fills node 1 completely before any other node holds the last block: no pipeline
    main(["plan", "pipelines", "--nodes", "8", "--algo", "ring"])
    ring = capsys.readouterr().out
    assert "form" not in ring and "tick   16: instances=1 solo=[1]" in ring


def test_plan_pipelines_json_ticks_are_consistent(capsys) -> None:
    main(["plan", "pipelines", "--nodes", "5", "--sources", "1", "--blocks", "4", "--chunks", "8",
          "--gpus-per-node", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "pipelines" and doc["gpus_per_node"] == 2
    last = doc["ticks"][-1]
    assert last["solo"] == [1, 2, 3, 4] and last["active"] == []
    for t in doc["ticks"]:
        assert t["instances"] == len(t["active"]) + len(t["solo"])


def test_plan_bad_input_is_a_user_error() -> None:
    with pytest.raises(LambdaScaleError, match=r"pipe\.chunks \(4\) must be >= pipe\.blocks \(9\)"):
        main(["plan", "multicast", "--nodes", "4", "--blocks", "9", "--chunks", "4"])
    with pytest.raises(LambdaScaleError, match=r"sources must be in \[1, n_nodes=4\]"):
        main(["plan", "multicast", "--nodes", "4", "--sources", "9"])
    with pytest.raises(LambdaScaleError, match="--chunk-mib must be > 0"):
        main(["plan", "pipelines", "--nodes", "4", "--chunk-mib", "0"])


def test_documented_example_matches_the_output(capsys) -> None:
    # docs/plan-json.md shows this exact document; keep the two in step
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "plan-json.md").read_text()
    example = json.loads(text.split("```json", 1)[1].split("```", 1)[0])
    main(["plan", "multicast", "--nodes", "4", "--blocks", "2", "--chunks", "2", "--json"])
    assert json.loads(capsys.readouterr().out) == example
