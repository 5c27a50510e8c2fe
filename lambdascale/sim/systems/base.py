"""A simulated system is a composition of policies: control-plane knobs plus a few data-plane switches.

Every system runs the same shared policies from ``lambdascale.control`` (autoscaler, placement,
memory manager, router) and the same planners from ``lambdascale.pipe``; what differs is how they
are configured (which multicast algorithm, how many sources, whether targets fetch over the
network, whether weights are copied back to host memory) and two data-plane switches the
simulator honours (execute-while-load pipelines; whether network targets may fetch from peers at
all). Adding a system is one small file that defines a :class:`System` and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import Tier


@dataclass(frozen=True)
class System:
    """One system under test.

    ``control`` overrides fields of :class:`ControlSettings` (validated when applied).
    ``execute_while_load``: receivers form λPipe pipelines and serve while the multicast runs.
    ``peer_fetch``: targets without a local copy may fetch from GPU/host holders over the network;
    when False they load from their SSD (or the model store) only.
    ``cache_tiers``: tiers the memory manager keeps copies in between scale events.
    ``keep_alive_s``: None = the simulation's ``sim.keep_alive_s``.
    ``baseline_sources``: a one-root multicast baseline; its sources are ``sim.baseline_sources``
    (1, as its paper has it; ``bench scale`` runs one tree or ring per holder).
    """

    name: str
    description: str
    control: dict[str, Any] = field(default_factory=dict)
    execute_while_load: bool = False
    peer_fetch: bool = True
    cache_tiers: tuple[Tier, ...] = (Tier.HOST, Tier.SSD)
    keep_alive_s: float | None = None
    baseline_sources: bool = False

    def control_settings(self, base: ControlSettings, baseline_sources: int = 1) -> ControlSettings:
        """``base`` with this system's overrides, validated (a bad override names the field)."""
        data = base.model_dump()
        data.update(self.control)
        if self.baseline_sources:
            data["placement_max_sources"] = baseline_sources
        return ControlSettings.model_validate(data)
