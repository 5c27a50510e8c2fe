"""Control-plane (policy) configuration section.

One flat section (``control.*`` in the config tree) so that every knob can become a CLI flag via
``add_config_args(parser, "control", [...])``. Field prefixes say which policy reads a knob:
``scale_*`` the autoscaler, ``placement_*`` placement, ``memory_*`` the memory manager,
``router_*`` the router. Per-model knobs (min/max instances, target concurrency, keep-alive,
tiers to cache in, scale-to-zero) live in each model's
:class:`~lambdascale.control.snapshot.DeploymentSpec`, not here.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MulticastAlgo(str, Enum):
    """Multicast algorithms; the values are the ``algo`` names of ``pipe.plan_multicast``."""

    BINOMIAL = "binomial"
    FAASNET = "faasnet"
    RING = "ring"
    DIRECT = "direct"


class RouteMetric(str, Enum):
    """What "least outstanding work" counts when the router compares instances."""

    REQUESTS = "requests"  # outstanding requests / capacity
    TOKENS = "tokens"  # outstanding tokens (prompt + tokens still to generate)


class ControlSettings(BaseModel):
    """Knobs of the autoscaler, placement, memory manager and router."""

    model_config = ConfigDict(extra="forbid")

    autoscale_interval_s: float = Field(default=0.5, gt=0, le=3600, description="period of the observe-decide-act loop")

    # ---- autoscaler ------------------------------------------------------------------------
    scale_up_utilization: float = Field(
        default=1.0,
        gt=0,
        le=8,
        description="scale out when load exceeds instances x target_concurrency x this (load = in-flight + queued)",
    )
    scale_down_utilization: float = Field(
        default=0.5,
        gt=0,
        le=8,
        description="scale in only to a count whose utilization stays at or below this; must be below "
        "scale_up_utilization (the gap is the hysteresis band that stops flapping)",
    )
    scale_down_cooldown_s: float = Field(
        default=10.0, ge=0, le=86400, description="no scale-in within this long after the model's last scale event"
    )
    scale_max_add_per_tick: int = Field(
        default=64, ge=1, le=4096, description="most instances one autoscaler pass adds to one model"
    )
    scale_max_remove_per_tick: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="most instances one autoscaler pass removes from one model (scale-out is fast, so idle GPUs "
        "are the cost to cut; the hysteresis band and cooldown already stop flapping)",
    )

    # ---- placement -------------------------------------------------------------------------
    placement_multicast_algo: MulticastAlgo = Field(
        default=MulticastAlgo.BINOMIAL, description="multicast algorithm for scale-outs that fetch over the network"
    )
    placement_max_sources: int = Field(
        default=8, ge=1, le=1024, description="most holders used as multicast sources in one scale-out"
    )
    placement_execute_while_load: bool = Field(
        default=True, description="let receivers serve as execution pipelines while the multicast runs"
    )
    placement_peer_fetch: bool = Field(
        default=True,
        description="targets without a local copy fetch from GPU/host holders over the network; off: they load "
        "from their SSD or the model store only (ServerlessLLM-style baselines)",
    )
    placement_network_over_ssd: bool = Field(
        default=True,
        description="a target whose only local copy is on SSD fetches over the network when a GPU/host holder exists",
    )

    # ---- memory manager --------------------------------------------------------------------
    memory_copy_back: bool = Field(
        default=True, description="after a scale-out, copy weights back to the cache tiers (host, SSD) in the background"
    )
    memory_max_copy_backs_per_node: int = Field(
        default=1, ge=1, le=64, description="most background copy-backs in progress per node and tier"
    )
    memory_default_keep_alive_s: float = Field(
        default=60.0, ge=0, le=7 * 86400, description="keep-alive for cached copies of models with no deployment spec"
    )

    # ---- router ----------------------------------------------------------------------------
    router_max_held: int = Field(
        default=64, ge=0, le=1_000_000, description="most requests held per model while no instance can take them; more are rejected"
    )
    router_metric: RouteMetric = Field(
        default=RouteMetric.REQUESTS, description="what least-outstanding-work routing compares: requests or tokens"
    )
    router_late_binding: bool = Field(
        default=False,
        description="late binding (router.dispatch): queued requests stay at the gateway and go to an instance only "
        "when it can start them in its next step (waiting prompt tokens within router_max_waiting_tokens), so "
        "instances and pipelines that appear later drain the backlog; off: bind at arrival to any free slot",
    )
    router_max_waiting_tokens: int = Field(
        default=8192,
        ge=1,
        le=10_000_000,
        description="with late binding: most prompt tokens dispatched to an instance and not yet started (one "
        "step's prefill budget); an instance with none waiting always takes the next request",
    )

    @model_validator(mode="after")
    def _check_band(self) -> "ControlSettings":
        if self.scale_down_utilization >= self.scale_up_utilization:
            raise ValueError(
                f"control.scale_down_utilization={self.scale_down_utilization} must be below "
                f"control.scale_up_utilization={self.scale_up_utilization} (hysteresis band)"
            )
        return self
