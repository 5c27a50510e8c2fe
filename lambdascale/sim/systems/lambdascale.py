"""λScale: binomial-pipeline multicast from every GPU/host holder, execute-while-load pipelines,
locality-aware placement, tiered memory with background copy-back to host memory."""

from lambdascale.control.spec import Tier
from lambdascale.sim.systems.base import System

SYSTEM = System(
    name="lambdascale",
    description="binomial multicast from all holders + λPipe execute-while-load + copy-back",
    control={"placement_multicast_algo": "binomial", "placement_max_sources": 8,
             "placement_network_over_ssd": True, "placement_execute_while_load": True,
             "memory_copy_back": True},
    execute_while_load=True,
    peer_fetch=True,
    cache_tiers=(Tier.HOST, Tier.SSD),
)
