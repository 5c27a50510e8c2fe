"""Tiered model store configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StoreSettings(BaseModel):
    """Capacities and policy knobs of the per-node store (SSD, host memory, GPU)."""

    model_config = ConfigDict(extra="forbid")

    host_capacity_gb: float = Field(default=8.0, gt=0, description="host-memory tier capacity per node, GB")
    gpu_capacity_gb: float = Field(default=0.0, ge=0, description="GPU tier capacity per node, GB (0 = no GPU tier)")
    keep_alive_s: float = Field(default=60.0, ge=0, description="default keep-alive before an idle model may be evicted")
    n_blocks: int = Field(default=8, ge=1, le=1024, description="execution blocks a model is cut into on import")
    chunks_per_block: int = Field(default=2, ge=1, le=1024, description="transfer chunks per block")
