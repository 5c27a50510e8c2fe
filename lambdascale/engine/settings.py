"""Engine configuration section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    """How a node runs a model."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="compute device; auto picks cuda when present"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="compute dtype; auto = float32 on CPU, bfloat16 on CUDA"
    )
    max_batch_size: int = Field(default=16, ge=1, le=4096, description="most sequences decoded in one step")
    max_model_len: int | None = Field(
        default=None, ge=16, description="context limit in tokens; None = the model's own limit"
    )
    max_num_batched_tokens: int = Field(
        default=512, ge=1, le=1 << 20,
        description="most tokens computed in one step (decodes plus prefill chunks); longer prompts are chunked",
    )
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for torch; None = torch's default"
    )
    batch_invariant: bool = Field(
        default=False,
        description=(
            "make each request's logits bitwise independent of which requests share its batch "
            "(CPU, float32/bfloat16): one torch thread, linear inputs padded to >= 4 rows, "
            "per-sequence attention, prefill chunks that depend only on the request; slower"
        ),
    )
