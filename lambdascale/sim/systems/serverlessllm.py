"""ServerlessLLM: every node loads from its own fastest tier (host memory, else NVMe) with a
chunked pipelined loader; locality-aware placement prefers nodes whose host memory holds the
model; loads stage through host memory, so a copy stays cached there. No network multicast."""

from lambdascale.control.spec import Tier
from lambdascale.sim.systems.base import System

SYSTEM = System(
    name="serverlessllm",
    description="local tiered loading (host, else SSD), locality-aware placement, host cache",
    control={"placement_network_over_ssd": False, "placement_execute_while_load": False,
             "memory_copy_back": True},
    execute_while_load=False,
    peer_fetch=False,
    cache_tiers=(Tier.HOST, Tier.SSD),
)
