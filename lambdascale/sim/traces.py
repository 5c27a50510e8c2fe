"""Trace readers: every supported file becomes a :class:`~lambdascale.sim.workload.Workload`.

Formats (detected from the content, not only the name):

* normalized CSV: header ``arrival_s,input_tokens,output_tokens`` (seconds since first request),
  optionally a fourth column ``model`` naming each request's catalogue model;
* BurstGPT CSV: header ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
  (seconds; ``Model`` becomes the request's model name);
* raw Azure LLM 2023 CSV: header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (wall-clock stamps);
* Mooncake JSONL: one object per line with ``timestamp`` (ms), ``input_length``, ``output_length``;
* a requests-per-second series: one number per line, one line per second (``Burst.txt``); its
  arrivals are spread uniformly inside each second and token lengths are resampled from a named
  trace (``lengths_from``), seeded.

``load_workload("synthetic:gamma,rate=3,cv=4", ...)`` builds a generator workload instead.
Errors name the file and line.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from lambdascale.sim.workload import Workload, WorkloadError, parse_synthetic, streams, synthetic


def _finish(name: str, arr: list[float], inp: list[int], out: list[int], models: list[str] | None = None,
            lines: list[int] | None = None) -> Workload:
    a = np.asarray(arr, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    a = a[order]
    if len(a):
        a = a - a[0]
    names = None if models is None else np.asarray(models, dtype=object)[order]
    src = None if lines is None else np.asarray(lines, dtype=np.int64)[order]
    return Workload(name, a, np.asarray(inp, dtype=np.int64)[order],
                    np.maximum(1, np.asarray(out, dtype=np.int64)[order]), model_names=names, source_lines=src)


#: BurstGPT's CSV layout (github.com/HPMLL/BurstGPT): seconds since the trace's start, the model
#: served (ChatGPT or GPT-4), prompt and response tokens, their sum, and the log type.
BURSTGPT_HEADER = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]


def _int(path: Path, lineno: int, field: str, value: str) -> int:
    try:
        v = int(float(value))
    except ValueError:
        raise WorkloadError(f"{path}:{lineno}: field {field} is not a number: {value!r}") from None
    if v < 0:
        raise WorkloadError(f"{path}:{lineno}: field {field} is negative: {v}")
    return v


def read_csv_trace(path: Path) -> Workload:
    """Normalized or raw-Azure CSV."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise WorkloadError(f"{path}: empty trace file") from None
        arr: list[float] = []
        inp: list[int] = []
        out: list[int] = []
        models: list[str] | None = None
        lines: list[int] = []
        if header in (["arrival_s", "input_tokens", "output_tokens"],
                      ["arrival_s", "input_tokens", "output_tokens", "model"]):
            width = len(header)
            models = [] if width == 4 else None
            for i, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != width:
                    raise WorkloadError(f"{path}:{i}: expected {width} fields, got {len(row)}")
                try:
                    arr.append(float(row[0]))
                except ValueError:
                    raise WorkloadError(f"{path}:{i}: field arrival_s is not a number: {row[0]!r}") from None
                inp.append(_int(path, i, "input_tokens", row[1]))
                out.append(_int(path, i, "output_tokens", row[2]))
                if models is not None:
                    if not row[3].strip():
                        raise WorkloadError(f"{path}:{i}: field model is empty")
                    models.append(row[3].strip())
                lines.append(i)
        elif header == BURSTGPT_HEADER:
            models = []
            for i, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(BURSTGPT_HEADER):
                    raise WorkloadError(f"{path}:{i}: expected {len(BURSTGPT_HEADER)} fields, got {len(row)}")
                try:
                    arr.append(float(row[0]))
                except ValueError:
                    raise WorkloadError(f"{path}:{i}: field Timestamp is not a number: {row[0]!r}") from None
                models.append(row[1].strip())
                inp.append(_int(path, i, "Request tokens", row[2]))
                out.append(_int(path, i, "Response tokens", row[3]))
                lines.append(i)
        elif header == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            for i, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != 3:
                    raise WorkloadError(f"{path}:{i}: expected 3 fields, got {len(row)}")
                stamp = row[0].strip()
                # Azure stamps carry 7 fractional digits; datetime takes at most 6.
                if "." in stamp:
                    head, frac = stamp.split(".", 1)
                    stamp = f"{head}.{frac[:6]}"
                try:
                    arr.append(datetime.fromisoformat(stamp).timestamp())
                except ValueError:
                    raise WorkloadError(f"{path}:{i}: bad TIMESTAMP {row[0]!r}") from None
                inp.append(_int(path, i, "ContextTokens", row[1]))
                out.append(_int(path, i, "GeneratedTokens", row[2]))
        else:
            raise WorkloadError(
                f"{path}: unknown CSV header {header}; expected arrival_s,input_tokens,output_tokens[,model], "
                f"TIMESTAMP,ContextTokens,GeneratedTokens or BurstGPT's {','.join(BURSTGPT_HEADER)}"
            )
    if not arr:
        raise WorkloadError(f"{path}: trace holds no requests")
    return _finish(path.stem, arr, inp, out, models, lines or None)


def read_mooncake(path: Path) -> Workload:
    """Mooncake JSONL (timestamps in milliseconds)."""
    arr: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                arr.append(float(rec["timestamp"]) / 1000.0)
                inp.append(int(rec["input_length"]))
                out.append(int(rec["output_length"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise WorkloadError(f"{path}:{i}: not a Mooncake record ({type(e).__name__}: {e})") from None
    if not arr:
        raise WorkloadError(f"{path}: trace holds no requests")
    return _finish(path.stem, arr, inp, out)


def read_rps_series(path: Path, lengths_from: Workload | None, seed: int,
                    default_in: int = 1024, default_out: int = 128) -> Workload:
    """A requests-per-second series; second ``k`` gets ``round(x_k)`` arrivals (stochastic rounding)."""
    rates: list[float] = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        try:
            v = float(s)
        except ValueError:
            raise WorkloadError(f"{path}:{i}: not a number: {s!r}") from None
        if v < 0 or not np.isfinite(v):
            raise WorkloadError(f"{path}:{i}: rate must be finite and >= 0, got {v}")
        rates.append(v)
    if not rates:
        raise WorkloadError(f"{path}: empty series")
    arr_rng, len_rng = streams(seed, 2)
    r = np.asarray(rates)
    counts = np.floor(r).astype(np.int64) + (arr_rng.random(len(r)) < (r - np.floor(r)))
    arr = np.repeat(np.arange(len(r), dtype=np.float64), counts) + arr_rng.random(int(counts.sum()))
    arr.sort()
    n = len(arr)
    if lengths_from is not None and len(lengths_from):
        idx = len_rng.integers(0, len(lengths_from), size=n)
        inp, out = lengths_from.input_tokens[idx], lengths_from.output_tokens[idx]
    else:
        inp = np.full(n, default_in, dtype=np.int64)
        out = np.full(n, default_out, dtype=np.int64)
    return Workload(path.stem, arr, inp, np.maximum(1, out))


def read_trace(path: str | Path, lengths_from: Workload | None = None, seed: int = 0) -> Workload:
    """Read any supported trace file, detecting its format."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"trace file not found: {p}")
    with p.open() as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return read_mooncake(p)
    if "," in first:
        return read_csv_trace(p)
    return read_rps_series(p, lengths_from, seed)


def load_workload(spec: str, seed: int = 0, lengths_from: str | Path | None = None) -> Workload:
    """``PATH`` or ``synthetic:NAME[,k=v...]``; ``lengths_from`` names a trace to draw lengths from."""
    lw = read_trace(lengths_from) if lengths_from is not None else None
    if spec.startswith("synthetic:"):
        return synthetic(parse_synthetic(spec[len("synthetic:"):]), seed, lw)
    return read_trace(spec, lw, seed)
