"""λPipe planners: multicast schedules, execution pipelines, and a schedule player.

Everything here is pure and deterministic; the runtime and the simulator both import it.
"""

from lambdascale.pipe.layout import ChunkLayout, LayoutError
from lambdascale.pipe.multicast import lower_bound_rounds, plan_multicast, source_order
from lambdascale.pipe.multicast_plan import (
    Algo,
    MulticastPlan,
    PlanError,
    PlanViolation,
    Send,
    SendKind,
    block_of_chunk,
    chunks_of_block,
    validate_plan,
)
from lambdascale.pipe.pipeline_types import Pipeline, PipelinePlan, Stage
from lambdascale.pipe.pipelines import PipelinePlanner, plan_pipelines, planned_sizes
from lambdascale.pipe.player import Links, PlayMode, PlayResult, play

__all__ = [
    "ChunkLayout", "LayoutError",
    "Algo", "MulticastPlan", "PlanError", "PlanViolation", "Send", "SendKind", "block_of_chunk",
    "chunks_of_block", "lower_bound_rounds", "plan_multicast", "source_order", "validate_plan",
    "Pipeline", "PipelinePlan", "PipelinePlanner", "Stage", "plan_pipelines", "planned_sizes",
    "Links", "PlayMode", "PlayResult", "play",
]
