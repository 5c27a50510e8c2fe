"""Gateway configuration section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ServeSettings(BaseModel):
    """The OpenAI-compatible gateway, its admin API and ``lambdascale serve``."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address the gateway binds")
    port: int = Field(default=8000, ge=0, le=65535, description="gateway port (0 = any free port)")
    backend: Literal["auto", "engine", "cluster", "fake"] = Field(
        default="auto",
        description="what serves tokens: cluster = runtime.nodes node agents scaled by the controller; engine = "
        "one in-process engine per model; fake = deterministic test backend (no model needed); auto = cluster",
    )
    model: list[str] = Field(
        default_factory=list,
        description="models to deploy at startup (names in the models dir); empty = the demo model if present",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted for inference (Authorization: Bearer KEY); empty and no admin keys = no auth",
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted for the admin API (and inference); with any key configured, admin needs one of these",
    )
    registry_path: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "lambdascale" / "registry.sqlite",
        description="SQLite file holding model registrations (deploy/update/delete survive restarts); "
        "default ~/.cache/lambdascale/registry.sqlite, beside the models cache, not the working directory",
    )
    max_queue_per_model: int = Field(
        default=64, ge=0, le=100_000,
        description="requests admitted beyond a model's free slots before new ones get 429",
    )
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After seconds sent with 429 and 503")
    default_max_tokens: int = Field(
        default=256, ge=1, le=1_000_000,
        description="max_tokens when a request omits it (capped by what the context leaves)",
    )
    execute_while_load: bool = Field(
        default=True,
        description="cluster backend: receivers of a multicast serve as λPipe pipelines before they hold the whole "
        "model (when the placement asks for it: control.placement_execute_while_load)",
    )
    warm_agents: bool = Field(
        default=True,
        description="cluster backend: import torch and the stage code on every node agent at start, so forming a "
        "stage (and a scale from zero) does not pay that import (about 1 s per agent, more on a loaded machine)",
    )
    late_binding: bool = Field(
        default=True,
        description="cluster backend: queued requests stay at the gateway and go to an instance only when it can "
        "start them in its next step (control.dispatch with router_late_binding on, whatever that knob says for "
        "the simulator); off: any free slot takes the oldest request",
    )
    first_token_timeout_s: float = Field(
        default=600.0, gt=0, le=86_400,
        description="a request still without its first token after this long (held while nothing could start) "
        "ends with 503",
    )
    max_stop_strings: int = Field(default=4, ge=0, le=64, description="most stop strings a request may carry")
    max_request_bytes: int = Field(
        default=1_000_000, ge=1024, le=1 << 30, description="largest request body accepted (413 beyond)"
    )
    timeline_poll_s: float = Field(
        default=0.5, gt=0, le=60, description="how often the gateway logs new scale-event milestones from the backend"
    )
    status_refresh_s: float = Field(
        default=1.0, gt=0, le=60, description="refresh period of `lambdascale status --watch`"
    )
