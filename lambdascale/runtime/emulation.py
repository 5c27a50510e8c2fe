"""``--emulate-device PROFILE``: agents' engine steps last at least as long as a GPU's would.

Two CPU cores cannot show what more GPUs buy: every agent computes on the same cores. With an
emulated device each stage step still computes for real, and then lasts at least the calibrated
time of the emulated accelerator for the same tokens (:class:`lambdascale.sim.costmodel.CostModel`,
the simulator's own cost model, so the emulated cluster and the simulator agree by construction).

PROFILE is ``CALIBRATION:MODEL[:SCALE]``: a calibration (packaged name such as ``h200``, or a file
path), the calibrated model whose per-layer times to use (e.g. ``llama2-7b``), and a factor that
scales every time (default 1). A stage that runs a fraction f of the served model's layers
emulates f of the calibrated model's full step time, so an 8-layer demo model split in two
stages behaves like a 7B model split in two.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from lambdascale.errors import LambdaScaleError


class DeviceProfile(BaseModel):
    """A parsed ``--emulate-device`` value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    calibration: str = Field(min_length=1, description="packaged calibration name (h200) or file path")
    model: str = Field(min_length=1, description="calibrated model whose per-layer times are used")
    scale: float = Field(default=1.0, gt=0, le=1e6, description="factor applied to every emulated time")

    @property
    def spec(self) -> str:
        return f"{self.calibration}:{self.model}:{self.scale:g}"


def parse_profile(spec: str) -> DeviceProfile:
    """``CALIBRATION:MODEL[:SCALE]`` -> :class:`DeviceProfile`; errors name the part that is wrong."""
    parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.split(":")
    if len(parts) == 3:
        try:
            scale = float(parts[2])
        except ValueError:
            parts, scale = spec.rsplit(":", 1), 1.0  # a path with a colon, no scale
        else:
            if not scale > 0:
                raise LambdaScaleError(f"--emulate-device {spec!r}: SCALE must be > 0, got {parts[2]}")
            parts = parts[:2]
    else:
        scale = 1.0
    if len(parts) != 2 or not all(parts):
        raise LambdaScaleError(f"--emulate-device {spec!r}: expected CALIBRATION:MODEL[:SCALE], e.g. h200:llama2-7b:1")
    return DeviceProfile(calibration=parts[0], model=parts[1], scale=scale)


@dataclass(frozen=True)
class StepTimer:
    """Emulated step time of one stage (``layer_fraction`` of the model's layers), seconds."""

    cost: object  # lambdascale.sim.costmodel.CostModel
    layer_fraction: float

    @classmethod
    def build(cls, profile: DeviceProfile, stage_layers: int, model_layers: int) -> "StepTimer":
        from lambdascale.model.arch import SHAPES
        from lambdascale.sim.costmodel import CostModel, load_calibration

        cal = load_calibration(profile.calibration)
        if profile.model not in cal.models:
            raise LambdaScaleError(
                f"--emulate-device: calibration {profile.calibration!r} has no model {profile.model!r} "
                f"(has: {sorted(cal.models)})"
            )
        if profile.model not in SHAPES:
            raise LambdaScaleError(f"--emulate-device: {profile.model!r} is not a registered model shape")
        cost = CostModel.build(cal, profile.model, SHAPES[profile.model],
                               prefill_scale=profile.scale, decode_scale=profile.scale)
        return cls(cost, stage_layers / model_layers)

    def floor_s(self, prefill_tokens: int, decode_seqs: int) -> float:
        """Least duration of a step with ``prefill_tokens`` prompt tokens and ``decode_seqs`` decodes."""
        c = self.cost
        return (c.prefill_s(prefill_tokens) + c.decode_s(decode_seqs)) * self.layer_fraction  # type: ignore[attr-defined]
