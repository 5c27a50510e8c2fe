"""GPU cost model: prefill and decode time of decoder layers, from calibration files.

Calibration file format (``lambdascale-calibration`` v1, JSON; see docs/sim-formats.md)::

    {"format": "lambdascale-calibration", "format_version": 1, "device": "NVIDIA H200",
     "copy": {"h2d_GBps": 54.0, "d2h_GBps": 54.5, "ssd_read_GBps": 1.55},
     "models": {"llama2-13b": {"layer_bytes": 634409000, "decode_context": 1024,
                               "prefill_ms_per_layer": {"128": 0.64, "512": 0.83, "2048": 2.09},
                               "decode_ms_per_layer": {"1": 0.71, "8": 0.98, "32": 2.63, "128": 9.18}}}}

Prefill time per layer is piecewise linear in the number of prompt tokens of the step (floor at
the smallest calibrated point: below it kernels are launch-bound; linear extrapolation past the
largest). Decode time per layer is piecewise linear in batch size, same rule. Context length is
taken as the calibrated one (1024) for decode. Models without their own entry borrow the nearest
calibrated model (by layer bytes) scaled by the layer-bytes ratio. A preset scales all prefill and
decode figures by its ``prefill_scale``/``decode_scale`` (another GPU than the calibrated one), and
an instance spanning ``tp`` GPUs divides per-layer time by ``tp`` then multiplies by
``1 + tp_overhead`` (all-reduce cost).

The raw measurement file in ../shared/calibration (``h200_2026-11-28.json``) is accepted too and
converted on load.
"""

from __future__ import annotations

import bisect
import json
from typing import Any
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambdascale.errors import LambdaScaleError
from lambdascale.model.arch import ModelArch


class CalibrationError(LambdaScaleError):
    """A calibration file is missing or malformed (the message names it and the field)."""


class ModelTiming(BaseModel):
    """Per-layer timings of one model shape on one GPU."""

    model_config = ConfigDict(extra="forbid")

    layer_bytes: float = Field(gt=0, description="bytes of one decoder layer's weights")
    decode_context: int = Field(default=1024, ge=1, description="context length of the decode figures")
    prefill_ms_per_layer: dict[int, float] = Field(min_length=1, description="prompt tokens -> ms per layer")
    decode_ms_per_layer: dict[int, float] = Field(min_length=1, description="batch size -> ms per layer")


class CopyBandwidth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    h2d_GBps: float = Field(gt=0, description="pinned host -> GPU")
    d2h_GBps: float = Field(gt=0, description="GPU -> pinned host")
    ssd_read_GBps: float = Field(gt=0, description="SSD -> pinned host")


class Calibration(BaseModel):
    """A calibration file."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(pattern="^lambdascale-calibration$")
    format_version: int = Field(ge=1, le=1)
    device: str
    source: str = Field(default="", description="where the figures come from")
    copy_bw: CopyBandwidth = Field(alias="copy")
    models: dict[str, ModelTiming] = Field(min_length=1)


def _from_raw_h200(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert the shared measurement file's layout into our calibration format."""
    cb = raw["copy_bandwidth"]
    models = {}
    for name, m in raw["layer_compute"].items():
        pre = {int(k.split("_")[1][1:]): v for k, v in m.items() if k.startswith("prefill_T")}
        dec = {int(k.split("_")[1][1:]): v for k, v in m.items() if k.startswith("decode_B")}
        models[name] = {"layer_bytes": m["layer_MB"] * 1e6, "decode_context": 1024,
                        "prefill_ms_per_layer": pre, "decode_ms_per_layer": dec}
    return {"format": "lambdascale-calibration", "format_version": 1, "device": raw["device"]["name"],
            "copy": {"h2d_GBps": cb["h2d_pinned_GBps"], "d2h_GBps": cb["d2h_pinned_GBps"],
                     "ssd_read_GBps": raw["ssd_read"]["read_cold_to_pinned_GBps"]},
            "models": models}


def load_calibration(name_or_path: str | Path) -> Calibration:
    """A packaged calibration (``h200``) or a file path (our format or the raw H200 measurement)."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        pkg = resources.files("lambdascale.sim") / "calibration" / f"{name_or_path}.json"
        if not pkg.is_file():
            raise CalibrationError(f"unknown calibration {name_or_path!r}: not a packaged name (h200) nor a file")
        text, source = pkg.read_text(), f"packaged calibration {name_or_path}"
    else:
        try:
            text, source = p.read_text(), str(p)
        except OSError as e:
            raise CalibrationError(f"cannot read calibration file {p}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"calibration file {source} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and "layer_compute" in raw and "format" not in raw:
        try:
            raw = _from_raw_h200(raw, source)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise CalibrationError(f"calibration file {source}: raw measurement layout lacks {e}") from None
    try:
        return Calibration.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise CalibrationError(f"calibration file {source}: {msgs}") from None


def _interp(points: dict[int, float], x: float) -> float:
    """Piecewise linear, floored at the first point, linearly extrapolated past the last."""
    xs = np.array(sorted(points), dtype=float)
    ys = np.array([points[int(k)] for k in xs], dtype=float)
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1] and len(xs) >= 2:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (x - xs[-1]))
    return float(np.interp(x, xs, ys))


@dataclass(frozen=True)
class CostModel:
    """Step times of one model on one instance (``tp`` GPUs), in seconds.

    Built once per (model, preset); its methods are pure and cheap (tables are pre-sorted).
    """

    prefill_pts: tuple[tuple[float, ...], tuple[float, ...]]
    decode_pts: tuple[tuple[float, ...], tuple[float, ...]]
    num_layers: int

    @classmethod
    def build(cls, cal: Calibration, model_name: str, arch: ModelArch, *, prefill_scale: float = 1.0,
              decode_scale: float = 1.0, tp: int = 1, tp_overhead: float = 0.15,
              dtype_bytes: int = 2) -> "CostModel":
        # Step time scales with the weights a token runs through: a mixture-of-experts layer
        # counts its router, top-k and shared experts (active parameters), not every expert;
        # the bytes a block moves (multicast, loads, memory) count them all (cluster.block_nbytes).
        layer_bytes = arch.active_layer_params() * dtype_bytes
        if model_name in cal.models:
            t, ratio = cal.models[model_name], 1.0
        else:
            name = min(cal.models, key=lambda k: abs(np.log(cal.models[k].layer_bytes / layer_bytes)))
            t, ratio = cal.models[name], layer_bytes / cal.models[name].layer_bytes
        tp_f = (1.0 + tp_overhead) / tp if tp > 1 else 1.0
        pre = {k: v * 1e-3 * ratio * prefill_scale * tp_f for k, v in t.prefill_ms_per_layer.items()}
        dec = {k: v * 1e-3 * ratio * decode_scale * tp_f for k, v in t.decode_ms_per_layer.items()}
        def srt(d: dict[int, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
            return tuple(float(k) for k in sorted(d)), tuple(d[k] for k in sorted(d))

        return cls(srt(pre), srt(dec), arch.num_hidden_layers)

    @classmethod
    def constant(cls, num_layers: int, prefill_s_per_layer: float, decode_s_per_layer: float) -> "CostModel":
        """A flat cost model (smoke tests): every step of ``k`` layers costs ``k * value``."""
        return cls(((1.0,), (prefill_s_per_layer,)), ((1.0,), (decode_s_per_layer,)), num_layers)

    @staticmethod
    def _lookup(pts: tuple[tuple[float, ...], tuple[float, ...]], x: float) -> float:
        xs, ys = pts
        if x <= xs[0] or len(xs) == 1:
            return ys[0]
        i = bisect.bisect_left(xs, x)
        if i >= len(xs):
            i = len(xs) - 1  # extrapolate along the last segment
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def prefill_s(self, tokens: int, layers: int | None = None) -> float:
        """Time to prefill ``tokens`` prompt tokens (one step, all new sequences) over ``layers``."""
        if tokens <= 0:
            return 0.0
        return self._lookup(self.prefill_pts, tokens) * (self.num_layers if layers is None else layers)

    def decode_s(self, batch: int, layers: int | None = None) -> float:
        """Time of one decode step for ``batch`` sequences over ``layers``."""
        if batch <= 0:
            return 0.0
        return self._lookup(self.decode_pts, batch) * (self.num_layers if layers is None else layers)
