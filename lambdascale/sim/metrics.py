"""What a simulation reports: one record per executed scale-out and the run's result arrays.

:func:`collect` turns the requests' timestamps and the sampled series into a :class:`SimResult`;
``sim/report.py`` prints and plots it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lambdascale.control.timeline import ScaleTimeline


@dataclass
class ScaleRecord:
    """One executed scale-out plan with its milestones."""

    timeline: ScaleTimeline
    n_targets: int
    n_network: int
    n_sources: int
    algo: str
    tiers: dict[str, int]
    model: str = ""


@dataclass
class ModelStats:
    """One catalogue model's counters over a run: where its instances started from (``starts``:
    gpu, host, ssd, store, network -> count), bytes moved to its GPUs per tier, copies evicted."""

    name: str
    shape: str
    gpus: int
    weight: float
    starts: dict[str, int]
    bytes_by_tier: dict[str, float]
    evictions: int


@dataclass
class SimResult:
    """Everything a report needs from one run (arrays indexed like the workload)."""

    system: str
    ttft: np.ndarray
    tpot: np.ndarray
    finish: np.ndarray
    gpu_seconds: float
    end_time: float
    scale_events: list[ScaleRecord]
    series_t: np.ndarray
    series_instances: np.ndarray
    series_pipelines: np.ndarray
    series_rate: np.ndarray
    migrations: int
    events: int
    unfinished: int
    kv_shipped: int = 0  # migrations whose KV cache was shipped (the others recomputed it)
    model_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # per request: its model
    models: list[ModelStats] = field(default_factory=list)
    evictions: int = 0
    # memory occupancy over time: GPUs held, host pools and SSDs used (shares of the cluster's)
    mem_t: np.ndarray = field(default_factory=lambda: np.empty(0))
    mem_gpu: np.ndarray = field(default_factory=lambda: np.empty(0))
    mem_host: np.ndarray = field(default_factory=lambda: np.empty(0))
    mem_ssd: np.ndarray = field(default_factory=lambda: np.empty(0))

    def slo_attainment(self, slo_s: float) -> float:
        ok = np.sum(np.nan_to_num(self.ttft, nan=np.inf) <= slo_s)
        return float(ok / max(1, len(self.ttft)))


def collect(system: str, arrival: Sequence[float], first_token: Sequence[float], finish: Sequence[float],
            outputs: Sequence[int], series: Sequence[tuple[float, int, int, int]], sample_interval_s: float, *,
            gpu_seconds: float, end_time: float, scale_events: list[ScaleRecord], migrations: int, events: int,
            kv_shipped: int) -> SimResult:
    """The result of a run: per request TTFT and TPOT (NaN where it never happened), and the
    sampled series ``(t, instances, pipelines, arrivals in the sample)``."""
    arr = np.array(arrival)
    first = np.array(first_token)
    fin = np.array(finish)
    outs = np.array(outputs)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(outs > 1, (fin - first) / np.maximum(1, outs - 1), np.nan)
    s = np.array(series, dtype=float).reshape(-1, 4)
    return SimResult(
        system=system, ttft=first - arr, tpot=tpot, finish=fin, gpu_seconds=gpu_seconds,
        end_time=end_time, scale_events=scale_events, series_t=s[:, 0], series_instances=s[:, 1],
        series_pipelines=s[:, 2], series_rate=s[:, 3] / sample_interval_s,
        migrations=migrations, events=events,
        unfinished=int(np.sum(np.isnan(fin))), kv_shipped=kv_shipped)


__all__ = ["ModelStats", "ScaleRecord", "SimResult", "collect"]
