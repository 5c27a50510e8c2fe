"""Simulator configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SimSettings(BaseModel):
    """Defaults of ``lambdascale simulate``."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="seed of every random component")
