"""Cluster runtime configuration section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RuntimeSettings(BaseModel):
    """How node agents are launched."""

    model_config = ConfigDict(extra="forbid")

    launcher: Literal["local", "ray"] = Field(default="local", description="local spawns agents here; ray places them on a Ray cluster")
    nodes: int = Field(default=4, ge=1, le=4096, description="node agents to run")
    address: str | None = Field(default=None, description="Ray cluster address for the ray launcher")
    heartbeat_s: float = Field(default=1.0, gt=0, description="agent heartbeat period")
