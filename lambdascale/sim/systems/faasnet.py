"""FaaSNet: chunk-pipelined binary-tree multicast from one root (or one tree per holder,
``sim.baseline_sources``); a node serves only once it holds the whole model; no host-memory cache
between scale events."""

from lambdascale.control.spec import Tier
from lambdascale.sim.systems.base import System

SYSTEM = System(
    name="faasnet",
    description="binary-tree multicast from one holder, serve when full",
    control={"placement_multicast_algo": "faasnet", "placement_network_over_ssd": True,
             "placement_execute_while_load": False, "memory_copy_back": False},
    execute_while_load=False,
    peer_fetch=True,
    cache_tiers=(Tier.SSD,),
    baseline_sources=True,
)
