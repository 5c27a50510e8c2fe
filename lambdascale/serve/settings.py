"""Gateway configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """The OpenAI-compatible gateway."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address the gateway binds")
    port: int = Field(default=8000, ge=0, le=65535, description="gateway port (0 = any free port)")
