"""Keep-alive only: instances load from the node's SSD and are kept warm for a long keep-alive
(``sim.keepalive_baseline_keep_alive_s``) to dodge cold starts; no multicast, no host cache."""

from lambdascale.control.spec import Tier
from lambdascale.sim.systems.base import System

SYSTEM = System(
    name="keepalive",
    description="local SSD loads, long keep-alive, no multicast or host cache",
    control={"placement_network_over_ssd": False, "placement_execute_while_load": False,
             "memory_copy_back": False},
    execute_while_load=False,
    peer_fetch=False,
    cache_tiers=(Tier.SSD,),
    keep_alive_s=-1.0,  # sentinel: use sim.keepalive_baseline_keep_alive_s
)
