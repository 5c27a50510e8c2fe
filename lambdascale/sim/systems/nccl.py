"""NCCL-style broadcast: a chunked ring (chain) broadcast of the whole model from one holder (or one
ring per holder, ``sim.baseline_sources``);
nodes serve after they hold the whole model; no host-memory cache between scale events."""

from lambdascale.control.spec import Tier
from lambdascale.sim.systems.base import System

SYSTEM = System(
    name="nccl",
    description="ring broadcast from one holder, serve when full",
    control={"placement_multicast_algo": "ring", "placement_network_over_ssd": True,
             "placement_execute_while_load": False, "memory_copy_back": False},
    execute_while_load=False,
    peer_fetch=True,
    cache_tiers=(Tier.SSD,),
    baseline_sources=True,
)
