"""``simulate`` and ``simulate scaling`` end to end, λPipe pipelines during a scale-out, and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import Tier
from lambdascale.errors import LambdaScaleError
from lambdascale.sim import cli
from lambdascale.sim.run import setup
from lambdascale.sim.scaling import simulate_scaling
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.systems import SYSTEMS, SystemKind


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lambdascale")
    sub = p.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


def test_execute_while_load_serves_before_any_node_is_full() -> None:
    s = SimSettings(model="llama2-13b", nodes=8, chunk_layout="uniform")  # DESIGN's example: chunk c in block c*B//K
    cluster, model, cost = setup(s)
    res = {k: simulate_scaling(cluster, model, SYSTEMS[k], s, ControlSettings(), cost, 8, 4, Tier.GPU)
           for k in (SystemKind.LAMBDASCALE, SystemKind.FAASNET, SystemKind.SERVERLESSLLM)}
    chunk_s = model.chunk_bytes[0] / (cluster.links.nic_gbps / 8 * 1e9) + cluster.links.nic_latency_us * 1e-6
    lam = res[SystemKind.LAMBDASCALE]
    # 4 sources, 4 receivers, 16 chunks / 8 blocks: every block exists whole somewhere after 4 ticks
    # (DESIGN.md), so the first 4-stage pipeline serves after 4 chunk times.
    assert lam.first_serve_s == pytest.approx(4 * chunk_s, rel=1e-6)
    assert lam.first_serve_s < lam.all_full_s
    assert res[SystemKind.FAASNET].first_serve_s > lam.all_full_s  # serve-when-full, one source
    # ServerlessLLM reads 26 GB from each node's NVMe.
    assert res[SystemKind.SERVERLESSLLM].all_full_s == pytest.approx(model.nbytes / (cluster.links.ssd_GBps * 1e9), rel=1e-6)


def test_scaling_cli_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["simulate", "scaling", "--model", "llama2-7b", "--nodes", "4", "--sources", "1",
                  "--systems", "lambdascale,nccl"]) == 0
    out = capsys.readouterr().out
    assert "llama2-7b" in out and "lambdascale" in out and "nccl" in out
    assert _main(["simulate", "scaling", "--model", "7b", "--nodes", "4", "--sources", "2", "--tier", "host", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["system"] for r in rows} == {"lambdascale", "serverlessllm", "faasnet", "nccl", "keepalive"}
    assert all(r["all_full_s"] >= r["first_serve_s"] > 0 for r in rows)


def test_scaling_cli_with_a_burst_reports_how_it_was_served(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["simulate", "scaling", "--cluster", "h200-ib400", "--model", "llama2-7b", "--nodes", "6", "--sources", "2",
            "--multicast-mode", "chunk", "--max-batch", "8", "--burst", "48", "--systems", "lambdascale,nccl"]
    assert _main(base) == 0
    out = capsys.readouterr().out
    assert "a burst of 48 requests (24 prompt, 8 output tokens)" in out and "TTFT p99" in out and "last done" in out
    assert _main(base + ["--json"]) == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        assert r["burst"] == 48
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["last_first_token_s"] < r["last_done_s"]
    # the burst outlasts what the 2 sources serve alone: pipelines take it before nccl's new instances
    assert rows["lambdascale"]["ttft_p99_s"] < rows["nccl"]["ttft_p99_s"]
    assert rows["lambdascale"]["last_first_token_s"] < rows["nccl"]["first_serve_s"]
    # Prompts of a few hundred tokens make a micro-batch's prefill compute-bound: with one step in
    # flight at a time a pipeline's stages no longer overlap and the burst waits longer. (24-token
    # prompts cost the GPU about the same whatever their number, so there one step of the whole
    # burst comes sooner than four micro-batches.)
    p99 = {}
    for mb in ("0", "1"):
        assert _main(base + ["--json", "--systems", "lambdascale", "--prompt-tokens", "256",
                             "--pipeline-microbatches", mb]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        p99[mb] = row["ttft_p99_s"]
    assert p99["1"] > p99["0"] * 1.2
    with pytest.raises(LambdaScaleError, match="--burst must be >= 0"):
        _main(base + ["--burst", "-1"])
    with pytest.raises(LambdaScaleError, match="--prompt-tokens, --max-tokens >= 1"):
        _main(base + ["--max-tokens", "0"])


def test_baselines_multicast_from_one_root_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["simulate", "scaling", "--cluster", "h200-ib400", "--model", "llama2-7b", "--nodes", "6", "--sources", "2",
            "--systems", "nccl,faasnet,lambdascale", "--json"]
    rows = {}
    for bs in ("1", "2"):
        assert _main(base + ["--baseline-sources", bs]) == 0
        rows[bs] = {r["system"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["1"]["nccl"]["how"] == "ring from 1 src" and rows["2"]["nccl"]["how"] == "ring from 2 src"
    assert rows["2"]["faasnet"]["how"] == "faasnet from 2 src"
    assert rows["2"]["nccl"]["all_full_s"] < rows["1"]["nccl"]["all_full_s"]  # two shorter rings
    assert rows["1"]["lambdascale"] == rows["2"]["lambdascale"]  # λScale uses every holder either way


def test_simulate_cli_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    rng = np.random.default_rng(0)
    arr = np.sort(rng.uniform(0, 30, 120))
    trace.write_text("arrival_s,input_tokens,output_tokens\n" + "".join(f"{a:.4f},512,16\n" for a in arr))
    rc = _main(["simulate", "--trace", str(trace), "--model", "llama2-7b", "--nodes", "4", "--json",
                "--systems", "lambdascale,serverlessllm", "--plots", str(tmp_path / "img"), "--target-concurrency", "2"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"] == 120 and [r["system"] for r in doc["systems"]] == ["lambdascale", "serverlessllm"]
    for row in doc["systems"]:
        assert row["unfinished"] == 0 and 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert row["gpu_seconds"] > 0
        assert len(row["scale_event_list"]) == row["scale_events"] > 0
        ev = row["scale_event_list"][0]
        assert ev["all_full_s"] >= ev["first_pipeline_s"] >= 0 and ev["targets"]
    assert doc["config"]["sim"]["target_concurrency"] == 2
    for name in ("ttft_cdf.png", "instances.png"):
        assert (tmp_path / "img" / name).stat().st_size > 1000
    # The table form.
    assert _main(["simulate", "--trace", "synthetic:poisson,rate=2,duration_s=20", "--model", "7b",
                  "--nodes", "2", "--systems", "keepalive", "--no-progress"]) == 0
    assert "keepalive" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(LambdaScaleError, match="trace file not found"):
        _main(["simulate", "--trace", str(tmp_path / "nope.csv"), "--no-progress"])
    with pytest.raises(LambdaScaleError, match="unknown cluster preset 'tpu'"):
        _main(["simulate", "--trace", "synthetic:poisson,duration_s=5", "--cluster", "tpu", "--no-progress"])
    with pytest.raises(LambdaScaleError, match="--sources must be in"):
        _main(["simulate", "scaling", "--nodes", "4", "--sources", "4"])
    with pytest.raises(LambdaScaleError, match="unknown model 'gpt5'"):
        _main(["simulate", "scaling", "--model", "gpt5", "--nodes", "4"])


def test_requests_on_pipelines_move_to_full_instances_without_losing_tokens() -> None:
    from lambdascale.sim.scaling import scale_once
    from lambdascale.sim.workload import Workload

    s = SimSettings(model="llama2-13b", nodes=8)
    cluster, model, cost = setup(s)
    # Sources hold the model in host memory: they load it locally (~0.48 s) while multicasting to
    # the 4 other nodes, whose pipelines serve from ~0.13 s. Requests arrive at 0.2 s with long
    # outputs, so they start on pipelines and are still running when the pipelines dissolve.
    n = 6
    w = Workload("w", np.full(n, 0.2), np.full(n, 256), np.full(n, 400))
    res, sim = scale_once(cluster, model, SYSTEMS[SystemKind.LAMBDASCALE], s, ControlSettings(), cost,
                          8, 4, Tier.HOST, workload=w)
    assert res.first_serve_s < 0.2 < res.all_full_s
    first_full = min(sim.scale_events[0].timeline.node_full_at.values())
    ttft = np.array([r.first_token - r.arrival for r in sim.reqs])
    assert np.all(0.2 + ttft < first_full)                # first tokens came from pipelines
    assert sim.migrations == n                             # every request moved once the pipelines dissolved
    assert all(r.generated == r.out and r.finish > first_full for r in sim.reqs)
    assert sim.scale_events[0].timeline.dissolved_at is not None


def test_config_file_sets_sim_and_control_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sim:\n  nodes: 3\n  model: llama2-7b\n  systems: nccl\ncontrol:\n  autoscale_interval_s: 1.0\n")
    assert _main(["simulate", "--config", str(cfg), "--trace", "synthetic:poisson,rate=1,duration_s=10", "--json",
                  "--seed", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nodes"] == 3 and doc["seed"] == 4 and doc["config"]["control"]["autoscale_interval_s"] == 1.0
    assert [r["system"] for r in doc["systems"]] == ["nccl"]
    bad = tmp_path / "b.yaml"
    bad.write_text("sim:\n  nodes: 0\n")
    with pytest.raises(LambdaScaleError, match="sim.nodes"):
        _main(["simulate", "--config", str(bad), "--trace", "synthetic:poisson,duration_s=5"])


def test_equal_byte_chunks_follow_the_checkpoint_layout() -> None:
    """Chunks cut at equal bytes over the blocks' real sizes, as the checkpoint format cuts them:
    block 0 (embedding) and the last (LM head) span more chunks, so a pipeline needs more chunks
    before every block is whole somewhere; the multicast itself moves the same bytes in the same time."""
    out = {}
    for lay in ("uniform", "equal-bytes"):
        s = SimSettings(model="llama2-7b", nodes=8, chunk_layout=lay)
        cluster, model, cost = setup(s)
        out[lay] = (model, simulate_scaling(cluster, model, SYSTEMS[SystemKind.LAMBDASCALE], s, ControlSettings(),
                                            cost, 8, 4, Tier.GPU))
    (um, ur), (em, er) = out["uniform"], out["equal-bytes"]
    assert em.nbytes == um.nbytes and max(em.chunk_bytes) - min(em.chunk_bytes) <= 1
    size = [em.layout.block_bounds[b + 1] - em.layout.block_bounds[b] for b in range(em.n_blocks)]
    assert size[0] > size[1] and size[-1] > size[1]  # the embedding, the LM head
    assert 0 not in em.blocks_held({0, 1}) and um.blocks_held({0, 1}) == {0}  # block 0 is more than 2 chunks now
    assert er.all_full_s == pytest.approx(ur.all_full_s, rel=1e-9)
    assert er.first_serve_s > ur.first_serve_s
    assert _main(["simulate", "scaling", "--model", "llama2-7b", "--nodes", "4", "--chunk-layout", "uniform",
                  "--systems", "lambdascale"]) == 0


def test_sources_lending_stages_serve_the_burst_sooner_and_pay_with_their_own_steps() -> None:
    """``sim.pipeline_helper_blocks``: serving sources run the blocks no receiver holds yet, so the
    first pipeline forms before the receivers hold every block between them (the issue-6 cluster:
    2 sources, 4 receivers, 8 blocks, 16 equal-byte chunks); the device time the sources lend
    delays their own requests, by no more than that time."""
    from lambdascale.sim.scaling import scale_once
    from lambdascale.sim.workload import Workload

    n = 48
    w = Workload("burst", np.zeros(n), np.full(n, 64), np.full(n, 8))
    out = {}
    for lend in (0, 2):
        # KV recomputed on dissolution: no KV flows share the NICs, so both runs multicast alike
        s = SimSettings(model="llama2-7b", cluster="h200-ib400", nodes=6, multicast_mode="chunk", max_batch=8,
                        pipeline_helper_blocks=lend, kv_move="recompute")
        cluster, model, cost = setup(s)
        out[lend] = scale_once(cluster, model, SYSTEMS[SystemKind.LAMBDASCALE], s, ControlSettings(), cost,
                               6, 2, Tier.GPU, workload=w)
    (plain, sim0), (lent, sim2) = out[0], out[2]
    assert lent.first_serve_s < plain.first_serve_s * 0.7
    assert lent.all_full_s == pytest.approx(plain.all_full_s)  # the multicast itself is the same
    # more of the burst has its first token by the time receivers alone could form a pipeline
    early = {k: sum(r.first_token < plain.first_serve_s for r in sim.reqs) for k, sim in ((0, sim0), (2, sim2))}
    assert early[2] > early[0]
    assert all(r.generated == r.out for r in sim2.reqs)
    # the sources' own requests (first tokens before any pipeline) finish later when they lend their devices
    own = [r.idx for r in sim0.reqs if r.first_token < lent.first_serve_s]
    assert len(own) >= 2 and {r.idx for r in sim2.reqs if r.first_token < lent.first_serve_s} == set(own)
    done = {k: max(sim.reqs[i].finish for i in own) for k, sim in ((0, sim0), (2, sim2))}
    assert done[2] > done[0]
