"""Tiered model store configuration section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StoreSettings(BaseModel):
    """Capacities and policy knobs of the per-node store (SSD, host memory, GPU)."""

    model_config = ConfigDict(extra="forbid")

    host_capacity_gb: float = Field(default=8.0, gt=0, description="host-memory tier capacity per node, GB")
    gpu_capacity_gb: float = Field(default=0.0, ge=0, description="GPU tier capacity per node, GB (0 = no GPU tier)")
    keep_alive_s: float = Field(default=60.0, ge=0, description="default keep-alive before an idle model may be evicted")
    n_blocks: int = Field(default=8, ge=1, le=1024, description="execution blocks a model is cut into on import")
    chunks_per_block: int = Field(default=2, ge=1, le=1024, description="transfer chunks per block on import: the model gets K = blocks x this many equal-byte chunks over its whole byte stream (a chunk may span two blocks)")
    strict_keep_alive: bool = Field(
        default=False,
        description="never evict a model inside its keep-alive (a load that needs the room fails instead)",
    )
    pinned: Literal["auto", "on", "off"] = Field(
        default="auto", description="pin the host pool: auto = pinned when CUDA is present"
    )
    ssd_gbps: float | None = Field(
        default=None, gt=0, le=1000, description="cap on SSD-tier read rate in GB/s (emulates a cluster's NVMe); None = no cap"
    )
    loader_io_threads: int = Field(
        default=8, ge=1, le=64, description="reads the SSD loader keeps in flight (threads)"
    )
    direct_io: bool = Field(
        default=True, description="read block files with O_DIRECT into the host pool (falls back to buffered reads)"
    )
    pool_align: int = Field(default=4096, ge=64, le=1 << 21, description="alignment of blocks in the host pool, bytes")
