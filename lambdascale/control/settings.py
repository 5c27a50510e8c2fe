"""Control-plane (policy) configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ControlSettings(BaseModel):
    """Knobs of the autoscaler, placement, memory manager and router."""

    model_config = ConfigDict(extra="forbid")

    autoscale_interval_s: float = Field(default=0.5, gt=0, description="period of the observe-decide-act loop")
