"""λPipe configuration section: defaults of ``lambdascale plan`` and of the schedule player."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lambdascale.pipe.multicast_plan import Algo


class PipeSettings(BaseModel):
    """Multicast planning defaults (the reference schedule: 8 blocks of 16 chunks, binomial)."""

    model_config = ConfigDict(extra="forbid")

    algo: Algo = Field(default=Algo.BINOMIAL, description="multicast algorithm: binomial|faasnet|ring|direct")
    blocks: int = Field(default=8, ge=1, le=1024, description="execution blocks per model")
    chunks: int = Field(default=16, ge=1, le=65536, description="transfer chunks per model (>= blocks); chunk c is in block c*B//K")
    gpus_per_node: int = Field(default=1, ge=1, le=64, description="GPUs per node; >1 plans network plus intra-node fan-out edges")
    nics_per_node: int = Field(default=1, ge=1, le=64, description="NICs per node, one per GPU on GPUs 0..n-1 (<= gpus_per_node); chunks are striped over them")
    nic_gbps: float = Field(default=400.0, gt=0, le=1e5, description="player: NIC bandwidth per node and direction, Gbit/s")
    latency_us: float = Field(default=5.0, ge=0, le=1e6, description="player: one-way network latency, microseconds")
    intra_gbps: float = Field(default=2400.0, gt=0, le=1e6, description="player: intra-node GPU-to-GPU link bandwidth, Gbit/s")

    @model_validator(mode="after")
    def _chunks_cover_blocks(self) -> "PipeSettings":
        if self.chunks < self.blocks:
            raise ValueError(f"pipe.chunks ({self.chunks}) must be >= pipe.blocks ({self.blocks}): every block needs a chunk")
        if self.nics_per_node > self.gpus_per_node:
            raise ValueError(f"pipe.nics_per_node ({self.nics_per_node}) must be <= pipe.gpus_per_node ({self.gpus_per_node})")
        return self
