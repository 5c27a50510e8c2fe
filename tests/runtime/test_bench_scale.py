"""``lambdascale bench scale``: the bound formula and a small end-to-end run through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from lambdascale.cli import main
from lambdascale.bench.scale import multicast_bound_s


def test_bound_formula_single_and_multi_source() -> None:
    # 1 source + 7 receivers, 16 chunks: (16 - 1 + 3) / 16 x size / rate
    assert multicast_bound_s(8, 1, 16, 1000, 100.0) == pytest.approx(18 / 16 * 10)
    # 2 sources, 6 receivers: groups of 3 receivers + source = 4 nodes -> ceil(log2 4) = 2
    assert multicast_bound_s(8, 2, 16, 1000, 100.0) == pytest.approx(17 / 16 * 10)
    # uneven split: 5 receivers over 2 sources -> the group of 3 (+ source) decides
    assert multicast_bound_s(7, 2, 16, 1000, 100.0) == pytest.approx((15 + math.ceil(math.log2(4))) / 16 * 10)


def test_bench_scale_cli_json(tmp_path, capsys, monkeypatch) -> None:
    import tempfile

    monkeypatch.setenv("LAMBDASCALE_MODELS", str(tmp_path))
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    rc = main(["bench", "scale", "--nodes", "3", "--link-gbps", "0.1", "--burst", "0", "--json",
               "--pipeline-helper-blocks", "2"])
    assert rc == 0
    assert not list(scratch_root.glob("lambdascale-bench-*")), "the scratch import was left behind"
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 3 and out["transport"] == "tcp" and out["n_chunks"] == 16
    assert out["pipeline_helper_blocks"] == 2  # the flag reaches runtime.pipeline_helper_blocks
    # by default every agent keeps a resident landing zone for one copy of the model
    assert out["model_bytes"] / 1e9 < out["device_arena_gb"] < out["model_bytes"] / 1e9 + 1e-4
    # the link cap is honoured: no faster than ~the bound (a 64 KiB bucket allows a little head start)
    assert out["vs_bound"] > 0.7
    assert len(out["multicast_receiver_gbps"]) == 2 and out["p2p_gbps"] > 0 and out["efficiency"] > 0


def test_bench_scale_rejects_bad_sources(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LAMBDASCALE_MODELS", str(tmp_path))
    assert main(["bench", "scale", "--nodes", "3", "--sources", "3"]) == 2
    assert "--sources must be in [1, nodes-1] = [1, 2], got 3" in capsys.readouterr().err


def test_bench_scale_rejects_unknown_system_and_bad_profile(capsys) -> None:
    assert main(["bench", "scale", "--systems", "lambdascale,vllm"]) == 2
    assert "--systems: unknown ['vllm']" in capsys.readouterr().err
    assert main(["bench", "scale", "--emulate-device", "h200"]) == 2
    assert "expected CALIBRATION:MODEL[:SCALE]" in capsys.readouterr().err


def test_bench_scale_two_sources_bf16_with_and_without_emulation(tmp_path, capsys, monkeypatch) -> None:
    """Issue 6's acceptance shape in miniature: 2 sources report the 1-source multicast side by side,
    bfloat16 stages match a bfloat16 single-node reference, and one run gives both burst tables."""
    monkeypatch.setenv("LAMBDASCALE_MODELS", str(tmp_path))
    rc = main(["bench", "scale", "--nodes", "4", "--sources", "2", "--link-gbps", "0.1", "--ssd-gbps", "0.8",
               "--burst", "4", "--max-tokens", "3", "--max-seqs", "2", "--stage-dtype", "bfloat16",
               "--systems", "lambdascale,faasnet", "--emulate-device", "h200:llama2-7b:1",
               "--also-without-emulation", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage_dtype"] == "bfloat16" and out["emulate_device"] == "h200:llama2-7b:1"
    for row in out["systems"]:  # the timeline the JSON carries: a first token per request, from a named instance
        assert set(row["ttft_s"]) == set(row["first_token_by"]) and len(row["ttft_s"]) == 4
        assert set(row["first_token_by"].values()) <= set(row["instance_started_s"])
        assert set(row["instance_forming_s"]) == set(row["instance_started_s"])
    # the single-source multicast ran capped in the same run: near or above its (larger) bound
    assert out["single_source_bound_s"] > out["bound_s"] and out["single_source_vs_bound"] > 0.7
    # the replayed plan with real chunk sizes is never faster than the equal-chunk formula
    assert out["plan_play_s"] >= out["bound_s"] * 0.999 and out["single_source_plan_play_s"] >= out["single_source_bound_s"] * 0.999
    for table in (out["systems"], out["systems_without_emulation"]):
        assert [x["system"] for x in table] == ["lambdascale", "faasnet"]
        assert all(x["exact"] and not x["mismatched_requests"] for x in table)


def test_plan_play_meets_the_formula_with_equal_byte_chunks(tmp_path) -> None:
    """A model whose first and last blocks carry the (big) embedding and LM head: its chunks are
    equal-byte ranges of the whole stream (format v2), so replaying the plan with real chunk
    sizes meets the equal-chunk formula (with chunks tiling blocks it took 1.4x)."""
    from lambdascale.model.manifest import read_manifest
    from lambdascale.pipe.multicast import Algo
    from lambdascale.bench.scale import plan_play_s, resolve_model

    m = read_manifest(resolve_model("synthetic:tiny-llama", tmp_path, None, 8, 2))
    sizes = m.chunk_lengths()
    formula = multicast_bound_s(6, 1, m.n_chunks, m.total_bytes, 1e6)
    played = plan_play_s(m, 6, 1, Algo.BINOMIAL, 1e6)
    blocks = [b.nbytes for b in m.blocks]
    assert max(blocks) > 1.4 * min(blocks)  # uneven blocks...
    assert max(sizes) - min(sizes) <= 1 and played <= 1.01 * formula  # ...equal chunks


def test_bench_scale_rejects_no_emulation_rerun_without_emulation(capsys) -> None:
    assert main(["bench", "scale", "--also-without-emulation"]) == 2
    assert "--also-without-emulation needs --emulate-device" in capsys.readouterr().err
    assert main(["bench", "scale", "--max-seqs", "0"]) == 2
    assert "--max-seqs must be in [1, 1024], got 0" in capsys.readouterr().err
    assert main(["bench", "scale", "--pipeline-helper-blocks", "-1"]) == 2
    assert "pipeline_helper_blocks" in capsys.readouterr().err


def test_a_failed_system_keeps_the_others(tmp_path, monkeypatch) -> None:
    """A system whose run fails (here nccl: an agent did not answer) is reported as failed with its
    error; the systems before and after it keep their figures, in the table, the JSON and the
    ``--out`` file rewritten as each system finishes."""
    import asyncio

    from lambdascale.bench import burst, scale
    from lambdascale.bench.burst import ScaleOutReport, SystemKind
    from lambdascale.runtime.cluster import NodeLostError

    class _Cluster:
        def __init__(self, *a, **k) -> None:
            self.cluster = None

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    async def prepare(*a, **k) -> None:
        return None

    async def serve(cluster, model_dir, manifest, sources, receivers, burst_, system, *a, **k):
        if system == "nccl":
            raise NodeLostError("node 2 did not answer HoldModel within 120.0s (runtime.request_timeout_s)")
        return ScaleOutReport(SystemKind(system), ttft={"r0": 0.5}, finish={"r0": 1.0}, outputs={"r0": [1, 2]})

    monkeypatch.setattr(scale, "LocalCluster", _Cluster)
    monkeypatch.setattr(burst, "prepare_sources", prepare)
    monkeypatch.setattr(burst, "serve_scale_out", serve)
    from types import SimpleNamespace

    monkeypatch.setattr(scale, "read_manifest", lambda d: SimpleNamespace(arch=SimpleNamespace(eos_token_id=2)))
    result = scale.ScaleBenchResult(model="m", model_bytes=1, n_chunks=1, n_blocks=1, nodes=3, sources=1,
                                    transport="tcp", link_gbps=None, ssd_gbps=None, source_load_s=0.0,
                                    multicast_s=0.0, bound_s=None, vs_bound=None, p2p_gbps=0.0)
    out = tmp_path / "result.json"
    seen: list[list[str]] = []

    def on_row(row) -> None:
        result.systems.append(row)
        scale.write_result(result, out)
        seen.append([r["system"] for r in json.loads(out.read_text())["systems"]])

    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings

    rows = asyncio.run(scale.run_systems(tmp_path, 3, 1, TransferSettings(), RuntimeSettings(),
                                         {"r0": None}, {"r0": [1, 2]}, ["lambdascale", "faasnet", "nccl", "local"],
                                         on_row=on_row))
    assert [r["system"] for r in rows] == ["lambdascale", "faasnet", "nccl", "local"]
    assert [bool(r.get("failed")) for r in rows] == [False, False, True, False]
    assert "did not answer HoldModel" in rows[2]["error"] and rows[3]["exact"] is True
    assert seen == [["lambdascale"], ["lambdascale", "faasnet"], ["lambdascale", "faasnet", "nccl"],
                    ["lambdascale", "faasnet", "nccl", "local"]]
    table = scale._systems_table(rows)
    assert "nccl         FAILED: NodeLostError: node 2 did not answer HoldModel" in table
    assert table.count("\n") == 4
