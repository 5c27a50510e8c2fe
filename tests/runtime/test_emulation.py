"""--emulate-device: profile parsing, the floor formula, and steps on an agent that honour it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import TokenState
from lambdascale.errors import LambdaScaleError
from lambdascale.model.arch import SHAPES
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.emulation import DeviceProfile, StepTimer, parse_profile
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import HoldModel
from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement
from lambdascale.sim.costmodel import CostModel, load_calibration
from tests.runtime.conftest import run_async


def test_parse_profile() -> None:
    assert parse_profile("h200:llama2-7b") == DeviceProfile(calibration="h200", model="llama2-7b", scale=1.0)
    assert parse_profile("h200:llama2-7b:2.5").scale == 2.5
    assert parse_profile("/tmp/x.json:llama2-13b:3").calibration == "/tmp/x.json"
    with pytest.raises(LambdaScaleError, match="expected CALIBRATION:MODEL"):
        parse_profile("h200")
    with pytest.raises(LambdaScaleError, match="SCALE must be > 0"):
        parse_profile("h200:llama2-7b:0")


def test_step_timer_is_the_simulator_cost_model_scaled_by_layer_fraction() -> None:
    t = StepTimer.build(parse_profile("h200:llama2-7b:2"), stage_layers=2, model_layers=8)
    cm = CostModel.build(load_calibration("h200"), "llama2-7b", SHAPES["llama2-7b"], prefill_scale=2, decode_scale=2)
    assert t.floor_s(100, 0) == pytest.approx(cm.prefill_s(100) / 4)
    assert t.floor_s(0, 3) == pytest.approx(cm.decode_s(3) / 4)
    assert t.floor_s(0, 0) == 0.0
    with pytest.raises(LambdaScaleError, match="has no model 'gpt-9'"):
        StepTimer.build(parse_profile("h200:gpt-9"), 1, 1)


def test_emulated_steps_last_at_least_the_gpu_time(tiny_model: Path) -> None:
    profile = "h200:llama2-7b:20"  # 20x an H200's 7B step: ~0.35 s prefill, ~0.3 s decode
    timer = StepTimer.build(parse_profile(profile), 8, 8)

    async def main() -> list[float]:
        async with LocalCluster(1) as lc:
            manifest = read_manifest(tiny_model)
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(tiny_model)))
            pipe = RemotePipeline(lc.cluster, manifest, [StagePlacement(0, (0, 8))], emulate_device=profile)
            await pipe.form()
            srv = PipelineServer(pipe)
            srv.add("a", TokenState((1, 2, 3, 4, 5, 6), (), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), 0))
            times = []
            while srv.busy:
                t0 = time.perf_counter()
                await srv.step()
                times.append(time.perf_counter() - t0)
            return times

    times = run_async(main())
    assert len(times) == 3
    assert times[0] >= timer.floor_s(6, 0) * 0.99
    assert all(t >= timer.floor_s(0, 1) * 0.99 for t in times[1:])
