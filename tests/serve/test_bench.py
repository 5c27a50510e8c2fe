"""Workloads of ``lambdascale bench serve``: trace reading, the synthetic profile, scaling."""

from __future__ import annotations

import pytest

from lambdascale.bench.serve import (
    BenchInputError,
    BenchResult,
    RequestResult,
    StatusSample,
    load_trace,
    scale_workload,
    synthetic_bursty,
)


def test_synthetic_profile_is_seeded_and_bursty() -> None:
    a = synthetic_bursty(duration_s=400, base_rps=0.5, burst_rps=6, burst_every_s=20, burst_len_s=4, seed=1)
    assert a == synthetic_bursty(duration_s=400, base_rps=0.5, burst_rps=6, burst_every_s=20, burst_len_s=4, seed=1)
    assert a != synthetic_bursty(duration_s=400, base_rps=0.5, burst_rps=6, burst_every_s=20, burst_len_s=4, seed=2)
    in_burst = sum(1 for r in a if r.arrival_s % 20 >= 16)
    calm = len(a) - in_burst
    # Expected: bursts 20 windows x 4 s x 6 rps = 480; calm 20 x 16 s x 0.5 rps = 160 (Poisson: +-4 sigma).
    assert abs(in_burst - 480) < 4 * 480**0.5
    assert abs(calm - 160) < 4 * 160**0.5
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))


def test_trace_reading_and_scaling(tmp_path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,input_tokens,output_tokens\n10,500,20\n12,3000,900\n30,5,1\n")
    reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [10, 12, 30]
    scaled = scale_workload(reqs, time_scale=0.5, max_input_tokens=256, max_output_tokens=64)
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in scaled] == [(0, 256, 20), (1, 256, 64), (10, 5, 1)]
    assert len(scale_workload(reqs, time_scale=0.5, max_duration_s=5)) == 2
    assert len(scale_workload(reqs, max_requests=1)) == 1


@pytest.mark.parametrize(("text", "fragment"), [
    ("a,b\n1,2\n", "must have columns"),
    ("arrival_s,input_tokens,output_tokens\n1,x,2\n", "row 2"),
    ("arrival_s,input_tokens,output_tokens\n5,1,1\n1,1,1\n", "row 3"),
])
def test_bad_trace_names_file_and_row(tmp_path, text: str, fragment: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(BenchInputError, match=fragment) as e:
        load_trace(p)
    assert str(p) in str(e.value)
    with pytest.raises(BenchInputError, match="cannot read"):
        load_trace(tmp_path / "missing.csv")


def test_summary_percentiles_and_node_seconds() -> None:
    reqs = [RequestResult(0.0, 200, ttft_s=t / 1000, itl_s=[0.01, 0.02], output_tokens=3) for t in range(1, 101)]
    reqs.append(RequestResult(1.0, 429))
    samples = [StatusSample(0.0, 1, 1), StatusSample(2.0, 2, 3), StatusSample(3.0, 2, 3)]
    s = BenchResult(reqs, samples, wall_s=10.0).summary()
    assert s["ok"] == 100 and s["by_status"] == {"200": 100, "429": 1}
    assert s["ttft_p50_ms"] == pytest.approx(50) and s["ttft_p99_ms"] == pytest.approx(99)
    assert s["itl_p50_ms"] == pytest.approx(10) and s["itl_p99_ms"] == pytest.approx(20)
    assert s["node_seconds"] == pytest.approx(1 * 2 + 3 * 1)
    assert s["throughput_tok_s"] == pytest.approx(30)


def test_burst_workload_is_bench_scales_burst() -> None:
    """``--trace burst:N`` replays bench scale's burst: same count, prompt lengths, token budget,
    sampling and seeds, all at t=0, with ids every vocabulary has."""
    from lambdascale.bench.scale import make_burst
    from lambdascale.bench.serve import burst_workload, scale_workload

    ref = list(make_burst(12, 127, 8, seed=3).values())
    w = scale_workload(burst_workload(12, 8, seed=3), max_input_tokens=256, max_output_tokens=8)
    assert len(w) == 12 and all(r.arrival_s == 0.0 for r in w)
    assert [r.prompt_ids for r in w] == [st.prompt_ids for st in ref]
    assert [r.input_tokens for r in w] == [len(st.prompt_ids) for st in ref]
    assert [(r.temperature, r.seed, r.output_tokens) for r in w] == [(st.params.temperature, st.seed, 8) for st in ref]
    assert {r.temperature for r in w} == {0.0, 0.8} and max(t for r in w for t in r.prompt_ids or ()) < 127
