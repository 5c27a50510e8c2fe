"""Workloads: request arrivals and token lengths, generated before the run.

Every system in a comparison replays the same :class:`Workload` object, so they see identical
arrivals. Each random component draws from its own ``numpy.random.Generator`` spawned from one
``SeedSequence`` (arrivals and token lengths never share a stream, so changing the length
distribution does not move arrivals).

Generators (``synthetic:NAME``):

* ``poisson``: exponential gaps at ``rate``.
* ``gamma``: Gamma-distributed gaps with mean ``1/rate`` and coefficient of variation ``cv``
  (shape ``1/cv^2``); ``cv=1`` is Poisson, larger is burstier.
* ``onoff``: a two-state modulated Poisson process: ``on_s``/``off_s`` mean (exponential) dwell
  times, ``burst`` times the base rate while on, scaled so the long-run mean rate is ``rate``.
* ``daily``: a non-homogeneous Poisson process ``rate * (1 + amplitude * sin(2 pi t / period_s))``
  by thinning (exact, no clipping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lambdascale.errors import LambdaScaleError


class WorkloadError(LambdaScaleError):
    """A trace file or generator specification is invalid (the message names it)."""


@dataclass(frozen=True)
class Workload:
    """``n`` requests sorted by arrival.

    Arrays (all length ``n``): ``arrival_s`` float64 seconds from the start, ``input_tokens`` and
    ``output_tokens`` int64 (output >= 1).
    """

    name: str
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    model: np.ndarray | None = None  # int64 catalogue index per request (sim.catalogue.assign_models)
    model_names: np.ndarray | None = None  # per request: the model a trace's `model` column names (str)
    source_lines: np.ndarray | None = None  # per request: its line in the trace file (for errors)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.input_tokens) != n or len(self.output_tokens) != n:
            raise WorkloadError(f"workload {self.name}: arrays differ in length")
        for a in (self.model, self.model_names, self.source_lines):
            if a is not None and len(a) != n:
                raise WorkloadError(f"workload {self.name}: arrays differ in length")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise WorkloadError(f"workload {self.name}: arrivals are not sorted")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def window(self, duration_s: float | None = None, time_scale: float = 1.0) -> "Workload":
        """Compress time by ``time_scale`` (2 = twice as fast), then keep arrivals before ``duration_s``."""
        if time_scale <= 0:
            raise WorkloadError(f"time scale must be positive, got {time_scale}")
        arr = self.arrival_s / time_scale
        keep = slice(None) if duration_s is None else slice(0, int(np.searchsorted(arr, duration_s, side="left")))

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return Workload(self.name, arr[keep], self.input_tokens[keep], self.output_tokens[keep],
                        cut(self.model), cut(self.model_names), cut(self.source_lines))


class Generator(str, Enum):
    """Synthetic arrival processes."""

    POISSON = "poisson"
    GAMMA = "gamma"
    ONOFF = "onoff"
    DAILY = "daily"


class SyntheticSpec(BaseModel):
    """Parameters of a synthetic workload (``synthetic:NAME[,key=value...]`` on the CLI)."""

    model_config = ConfigDict(extra="forbid")

    generator: Generator
    rate: float = Field(default=5.0, gt=0, le=1e5, description="mean requests per second")
    duration_s: float = Field(default=600.0, gt=0, le=30 * 86400, description="length of the arrival stream")
    cv: float = Field(default=2.0, gt=0, le=50, description="coefficient of variation of gaps (gamma)")
    on_s: float = Field(default=30.0, gt=0, description="mean on-period (onoff)")
    off_s: float = Field(default=90.0, gt=0, description="mean off-period (onoff)")
    burst: float = Field(default=10.0, ge=1, le=1e4, description="on-rate over off-rate (onoff)")
    period_s: float = Field(default=86400.0, gt=0, description="cycle length (daily)")
    amplitude: float = Field(default=0.8, ge=0, le=1, description="relative swing of the rate (daily)")
    input_tokens: int = Field(default=1024, ge=1, le=1_000_000, description="mean prompt length")
    output_tokens: int = Field(default=128, ge=1, le=1_000_000, description="mean output length")


def parse_synthetic(text: str) -> SyntheticSpec:
    """``poisson,rate=4,duration_s=60`` -> :class:`SyntheticSpec` with a clear error on bad keys."""
    from pydantic import ValidationError

    name, *pairs = [p.strip() for p in text.split(",") if p.strip()]
    data: dict[str, object] = {"generator": name}
    for p in pairs:
        if "=" not in p:
            raise WorkloadError(f"synthetic workload {text!r}: expected key=value, got {p!r}")
        k, v = p.split("=", 1)
        data[k.strip()] = v.strip()
    try:
        return SyntheticSpec.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise WorkloadError(f"synthetic workload {text!r}: {msgs} (generators: {', '.join(g.value for g in Generator)})") from None


def streams(seed: int, n: int = 2) -> list[np.random.Generator]:
    """``n`` independent generators spawned from one seed (arrivals, lengths, ...)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def poisson_arrivals(rng: np.random.Generator, rate: float, duration_s: float) -> np.ndarray:
    """Homogeneous Poisson arrivals on [0, duration) (exponential gaps, never clipped)."""
    return gamma_arrivals(rng, rate, 1.0, duration_s)


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, duration_s: float) -> np.ndarray:
    """Renewal process with Gamma gaps: mean ``1/rate``, coefficient of variation ``cv``."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    out: list[np.ndarray] = []
    t = 0.0
    block = max(64, int(rate * duration_s * 1.1) + 64)
    while t < duration_s:
        gaps = rng.gamma(shape, scale, size=block)
        times = t + np.cumsum(gaps)
        out.append(times)
        t = float(times[-1])
    arr = np.concatenate(out) if out else np.empty(0)
    return arr[arr < duration_s]


def onoff_arrivals(rng: np.random.Generator, rate: float, on_s: float, off_s: float, burst: float,
                   duration_s: float) -> np.ndarray:
    """Markov-modulated Poisson: rate ``hi`` while on and ``lo = hi / burst`` while off.

    Mean rate = (on*hi + off*lo)/(on+off) = ``rate``, so ``hi = rate*(on+off)/(on + off/burst)``.
    """
    hi = rate * (on_s + off_s) / (on_s + off_s / burst)
    lo = hi / burst
    out: list[np.ndarray] = []
    t, on = 0.0, bool(rng.random() < on_s / (on_s + off_s))
    while t < duration_s:
        dwell = float(rng.exponential(on_s if on else off_s))
        end = min(duration_s, t + dwell)
        r = hi if on else lo
        n = int(rng.poisson(r * (end - t)))
        # Given the count, Poisson arrivals in an interval are uniform order statistics.
        out.append(np.sort(rng.uniform(t, end, size=n)))
        t, on = end, not on
    return np.concatenate(out) if out else np.empty(0)


def daily_arrivals(rng: np.random.Generator, rate: float, amplitude: float, period_s: float,
                   duration_s: float) -> np.ndarray:
    """Non-homogeneous Poisson with a sinusoidal rate, by thinning a ``rate*(1+amplitude)`` stream."""
    peak = rate * (1.0 + amplitude)
    cand = poisson_arrivals(rng, peak, duration_s)
    lam = rate * (1.0 + amplitude * np.sin(2.0 * math.pi * cand / period_s))
    keep = rng.random(len(cand)) < lam / peak
    return cand[keep]


def lengths_like(rng: np.random.Generator, n: int, mean: int) -> np.ndarray:
    """Token lengths with the given mean: geometric-like (exponential, rounded, >= 1)."""
    return np.maximum(1, np.rint(rng.exponential(mean, size=n))).astype(np.int64)


def synthetic(spec: SyntheticSpec, seed: int, lengths_from: Workload | None = None) -> Workload:
    """Generate a synthetic workload; token lengths are resampled from ``lengths_from`` if given."""
    arr_rng, len_rng = streams(seed, 2)
    g = spec.generator
    if g is Generator.POISSON:
        arr = poisson_arrivals(arr_rng, spec.rate, spec.duration_s)
    elif g is Generator.GAMMA:
        arr = gamma_arrivals(arr_rng, spec.rate, spec.cv, spec.duration_s)
    elif g is Generator.ONOFF:
        arr = onoff_arrivals(arr_rng, spec.rate, spec.on_s, spec.off_s, spec.burst, spec.duration_s)
    else:
        arr = daily_arrivals(arr_rng, spec.rate, spec.amplitude, spec.period_s, spec.duration_s)
    n = len(arr)
    if lengths_from is not None and len(lengths_from):
        idx = len_rng.integers(0, len(lengths_from), size=n)
        inp, out = lengths_from.input_tokens[idx], lengths_from.output_tokens[idx]
    else:
        inp = lengths_like(len_rng, n, spec.input_tokens)
        out = lengths_like(len_rng, n, spec.output_tokens)
    return Workload(f"synthetic:{g.value}", arr, inp.astype(np.int64), np.maximum(1, out).astype(np.int64))
