"""Statistical checks of the synthetic generators, and trace readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lambdascale.sim.traces import load_workload, read_trace
from lambdascale.sim.workload import (
    Generator, SyntheticSpec, WorkloadError, parse_synthetic, synthetic,
)


def _cv(x: np.ndarray) -> float:
    return float(np.std(x) / np.mean(x))


def test_poisson_rate_and_cv_within_5_percent() -> None:
    w = synthetic(SyntheticSpec(generator=Generator.POISSON, rate=20.0, duration_s=5000.0), seed=1)
    assert len(w) / 5000.0 == pytest.approx(20.0, rel=0.05)
    assert _cv(np.diff(w.arrival_s)) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_rate_and_cv_within_5_percent(cv: float) -> None:
    w = synthetic(SyntheticSpec(generator=Generator.GAMMA, rate=10.0, cv=cv, duration_s=20000.0), seed=2)
    assert len(w) / 20000.0 == pytest.approx(10.0, rel=0.05)
    assert _cv(np.diff(w.arrival_s)) == pytest.approx(cv, rel=0.05)


def test_onoff_mean_rate_and_burstiness() -> None:
    spec = SyntheticSpec(generator=Generator.ONOFF, rate=5.0, on_s=20.0, off_s=60.0, burst=20.0, duration_s=200_000.0)
    w = synthetic(spec, seed=3)
    assert len(w) / spec.duration_s == pytest.approx(5.0, rel=0.05)
    # Per-second counts of a modulated process are over-dispersed (a Poisson stream has CV ~ 1/sqrt(rate)).
    counts = np.bincount(w.arrival_s.astype(int))
    assert _cv(counts) > 2 * (1 / np.sqrt(5.0))


def test_daily_cycle_mean_rate_and_peak_to_trough() -> None:
    spec = SyntheticSpec(generator=Generator.DAILY, rate=2.0, amplitude=0.8, period_s=1000.0, duration_s=100_000.0)
    w = synthetic(spec, seed=4)
    assert len(w) / spec.duration_s == pytest.approx(2.0, rel=0.05)
    phase = (w.arrival_s % 1000.0) // 250  # quarter of the cycle
    q = np.bincount(phase.astype(int), minlength=4) / (spec.duration_s / 4)
    # Quarter 0 holds the rise to the peak, quarter 2 the fall to the trough: mean rate there is
    # rate * (1 +- 2A/pi).
    assert q[0] == pytest.approx(2.0 * (1 + 2 * 0.8 / np.pi), rel=0.05)
    assert q[2] == pytest.approx(2.0 * (1 - 2 * 0.8 / np.pi), rel=0.05)


def test_same_seed_same_workload_and_different_seed_differs() -> None:
    spec = parse_synthetic("gamma,rate=3,cv=2,duration_s=100")
    a, b, c = synthetic(spec, 7), synthetic(spec, 7), synthetic(spec, 8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s[:10], c.arrival_s[:10])


def test_bad_synthetic_spec_names_field() -> None:
    with pytest.raises(WorkloadError, match="rate"):
        parse_synthetic("poisson,rate=-1")
    with pytest.raises(WorkloadError, match="generators"):
        parse_synthetic("weibull")


def test_window_and_time_scale() -> None:
    w = synthetic(SyntheticSpec(generator=Generator.POISSON, rate=10.0, duration_s=100.0), seed=0)
    half = w.window(duration_s=25.0, time_scale=2.0)
    assert half.arrival_s.max() < 25.0
    assert len(half) == int(np.sum(w.arrival_s / 2 < 25.0))


def test_readers_on_small_files(tmp_path: Path) -> None:
    norm = tmp_path / "n.csv"
    norm.write_text("arrival_s,input_tokens,output_tokens\n0.5,10,3\n0.0,20,4\n")
    w = read_trace(norm)
    assert list(w.arrival_s) == [0.0, 0.5] and list(w.input_tokens) == [20, 10]
    az = tmp_path / "a.csv"
    az.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
                  "2023-11-16 18:17:05.0319600,3180,8\n")
    assert read_trace(az).arrival_s[1] == pytest.approx(1.052, abs=1e-6)
    mc = tmp_path / "m.jsonl"
    mc.write_text('{"timestamp": 1000, "input_length": 5, "output_length": 2, "hash_ids": []}\n'
                  '{"timestamp": 4000, "input_length": 6, "output_length": 1, "hash_ids": []}\n')
    assert list(read_trace(mc).arrival_s) == [0.0, 3.0]
    rps = tmp_path / "r.txt"
    rps.write_text("2\n0\n3.5\n")
    r = read_trace(rps, lengths_from=w, seed=1)
    assert 5 <= len(r) <= 6 and np.all(np.isin(r.input_tokens, [10, 20]))
    assert np.sum(r.arrival_s < 1.0) == 2 and np.sum((r.arrival_s >= 1) & (r.arrival_s < 2)) == 0


def test_bad_trace_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_tokens,output_tokens\n0.0,10,3\n1.0,x,3\n")
    with pytest.raises(WorkloadError, match=r"bad.csv:3: field input_tokens"):
        read_trace(bad)
    other = tmp_path / "o.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(WorkloadError, match="unknown CSV header"):
        read_trace(other)
    with pytest.raises(WorkloadError, match="not found"):
        read_trace(tmp_path / "missing.csv")


def test_real_traces_load(traces_dir: Path) -> None:
    code = read_trace(traces_dir / "normalized" / "azure_llm_2023_code.csv")
    raw = read_trace(traces_dir / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv")
    assert len(code) == len(raw) == 8819
    assert np.allclose(code.arrival_s, raw.arrival_s, atol=1e-3)
    conv = load_workload(str(traces_dir / "normalized" / "azure_llm_2023_conv.csv"))
    assert len(conv) == 19366
    burst = load_workload(str(traces_dir / "lambdascale_burst" / "Burst.txt"), seed=0,
                          lengths_from=traces_dir / "normalized" / "azure_llm_2023_conv.csv")
    assert len(burst) > 100
