"""KV on dissolution: shipping and recomputing give identical streams; the choice follows the costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.errors import LambdaScaleError
from lambdascale.model.arch import SHAPES
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.kvmove import (
    KvMove, KvPolicy, RecomputeEstimate, choose_kv_move, kv_bytes_per_token, ship_kv,
)
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import HoldModel
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement
from lambdascale.runtime.settings import RuntimeSettings
from tests.runtime.conftest import run_async
from tests.runtime.test_pipeline import REQS, eos, reference  # noqa: F401 (fixture)


def test_kv_bytes_follow_the_shape() -> None:
    a = SHAPES["llama2-7b"]  # 32 layers, 32 kv heads x 128: 512 KiB per token in fp16
    assert kv_bytes_per_token(a, "float16") == 2 * 32 * 32 * 128 * 2 == 512 << 10
    assert kv_bytes_per_token(SHAPES["llama3-8b"], "bfloat16") == 2 * 32 * 8 * 128 * 2  # GQA: 8 kv heads
    with pytest.raises(LambdaScaleError, match="int8"):
        kv_bytes_per_token(a, "int8")


def test_choice_follows_the_costs() -> None:
    per_tok = kv_bytes_per_token(SHAPES["llama2-7b"], "float16")
    tokens = 512
    # 400 Gbit/s NIC (50 GB/s): 268 MB of KV in ~5.4 ms + 1 ms overhead, vs a 13 ms prefill: ship
    fast = choose_kv_move(tokens, tokens * per_tok, 50e9, recompute_s=0.013, ship_overhead_s=0.001)
    assert fast.choice is KvMove.SHIP and fast.ship_s == pytest.approx(tokens * per_tok / 50e9 + 0.001)
    # a 10 Gbit/s link: ~215 ms to ship, recomputing is cheaper
    slow = choose_kv_move(tokens, tokens * per_tok, 1.25e9, recompute_s=0.013, ship_overhead_s=0.001)
    assert slow.choice is KvMove.RECOMPUTE and slow.ship_s > slow.recompute_s
    # the policy can force either way; nothing cached means nothing to ship
    assert choose_kv_move(tokens, tokens * per_tok, 1.25e9, 0.013, KvPolicy.SHIP).choice is KvMove.SHIP
    assert choose_kv_move(tokens, tokens * per_tok, 50e9, 0.013, "recompute").choice is KvMove.RECOMPUTE
    assert choose_kv_move(0, 0, 50e9, 0.013, "ship").choice is KvMove.RECOMPUTE
    # a tie recomputes (no bytes moved for nothing)
    assert choose_kv_move(10, 100, 100.0, 1.0).choice is KvMove.RECOMPUTE
    with pytest.raises(LambdaScaleError, match="link rate must be > 0"):
        choose_kv_move(1, 1, 0.0, 1.0)
    with pytest.raises(LambdaScaleError, match="must be >= 0"):
        choose_kv_move(-1, 1, 1.0, 1.0)
    with pytest.raises(ValueError):
        choose_kv_move(1, 1, 1.0, 1.0, "teleport")


def test_recompute_estimate_uses_the_emulated_floor() -> None:
    from lambdascale.runtime.emulation import StepTimer, parse_profile

    est = RecomputeEstimate(tokens_per_s=1000.0)
    assert est.seconds(500) == pytest.approx(0.5)
    timer = StepTimer.build(parse_profile("h200:llama2-7b:1000"), 32, 32)
    emu = RecomputeEstimate(tokens_per_s=1e9, cost=timer)
    assert emu.seconds(512) == pytest.approx(timer.floor_s(512, 0)) and emu.seconds(512) > 512 / 1e9


def test_ship_and_recompute_give_identical_streams(tiny_model: Path, reference) -> None:  # noqa: F811
    """A 4-stage pipeline (node 0 runs two non-adjacent stages) serves 3 steps, then dissolves:
    once into a full instance on node 0 (part of the KV is already local) with KV shipped, once
    into a full instance on node 3 by recomputing. Both streams equal the single-node run."""

    async def main() -> dict[str, object]:
        async with LocalCluster(4, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            for n in range(4):
                await lc.cluster.request(n, HoldModel(req=0, model_dir=str(tiny_model)))
            placements = [StagePlacement(0, (0, 3)), StagePlacement(1, (3, 5)), StagePlacement(0, (5, 6)),
                          StagePlacement(2, (6, 8))]
            results: dict[str, object] = {}
            for mode, dest in (("ship", 0), ("recompute", 3)):
                pipe = RemotePipeline(lc.cluster, manifest, placements, name=f"src-{mode}")
                await pipe.form()
                streamed: dict[str, list[int]] = {r: [] for r in REQS}
                srv = PipelineServer(pipe, eos(tiny_model), on_token=lambda r, t, s=streamed: s[r].append(t))
                for rid, st in REQS.items():
                    srv.add(rid, st)
                await srv.run(max_steps=3)
                moved = srv.take_progress()
                full = RemotePipeline(lc.cluster, manifest, [StagePlacement(dest, (0, 8))], name=f"full-{mode}")
                await full.form()
                srv2 = PipelineServer(full, eos(tiny_model), on_token=lambda r, t, s=streamed: s[r].append(t))
                if mode == "ship":
                    results["bytes"] = await ship_kv(lc.cluster, pipe, full, list(moved))
                    for rid, (st, computed) in moved.items():
                        srv2.add(rid, st, computed=computed)
                    # shipped KV: the first step on the full instance is a pure decode
                    results["first_step"] = [len(r.all_ids) - r.computed for r in srv2.reqs.values()]
                    results["computed"] = {rid: c for rid, (_, c) in moved.items()}
                else:
                    for rid, (st, _) in moved.items():
                        srv2.add(rid, st)
                await pipe.dissolve()
                await srv2.run()
                await full.dissolve()
                results[mode] = streamed
            return results

    res = run_async(main(), timeout=120)
    assert res["ship"] == reference and res["recompute"] == reference  # identical, token for token
    assert res["first_step"] == [1, 1, 1]
    arch = read_manifest(tiny_model).arch
    # only stage 1 (blocks 3-4) and stage 3 (blocks 6-7) were remote from node 0: 4 of 8 layers
    per_layer_tok = kv_bytes_per_token(arch, "float32") // arch.num_hidden_layers
    computed = res["computed"]
    assert res["bytes"] == sum(computed.values()) * per_layer_tok * 4


def test_a_failed_kv_import_takes_no_slot(tiny_model: Path, reference) -> None:  # noqa: F811
    """Three requests' KV shipped to a full instance with room for two: the import fails whole
    (no slot kept for the first two), so shipping two of them then works and their streams are exact."""
    from lambdascale.runtime.cluster import AgentRequestError

    async def main() -> tuple[dict[str, list[int]], list[str]]:
        async with LocalCluster(3, runtime=RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            for n in range(3):
                await lc.cluster.request(n, HoldModel(req=0, model_dir=str(tiny_model)))
            pipe = RemotePipeline(lc.cluster, manifest, [StagePlacement(0, (0, 4)), StagePlacement(1, (4, 8))])
            await pipe.form()
            streamed: dict[str, list[int]] = {r: [] for r in REQS}
            srv = PipelineServer(pipe, eos(tiny_model), on_token=lambda r, t: streamed[r].append(t))
            for rid, st in REQS.items():
                srv.add(rid, st)
            await srv.run(max_steps=2)
            moved = srv.take_progress()
            full = RemotePipeline(lc.cluster, manifest, [StagePlacement(2, (0, 8))], max_seqs=2)
            await full.form()
            with pytest.raises(AgentRequestError):
                await ship_kv(lc.cluster, pipe, full, list(moved))
            two = list(moved)[:2]
            await ship_kv(lc.cluster, pipe, full, two)  # would fail if the first attempt had kept slots
            srv2 = PipelineServer(full, eos(tiny_model), on_token=lambda r, t: streamed[r].append(t))
            for rid in two:
                st, computed = moved[rid]
                srv2.add(rid, st, computed=computed)
            await srv2.run()
            await pipe.dissolve()
            await full.dissolve()
            return streamed, two

    streamed, two = run_async(main(), timeout=120)
    assert {r: streamed[r] for r in two} == {r: reference[r] for r in two}
