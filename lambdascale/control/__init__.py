"""Control plane: the snapshot contract, the four pure policies and the controller loop.

Every policy is a pure function of (snapshot, config, now); the real controller (gateway) and the
simulator both call them. One tick, as a simulator would run it::

    from lambdascale.control import (ClusterSnapshot, ControlSettings, autoscale, place_all,
                                     manage_memory, route)
    cfg = ControlSettings()
    decisions = autoscale(snap, cfg, now)          # per model: add n / remove ids
    plans = place_all(snap, decisions, cfg, now)   # targets, sources + tiers, multicast algo
    memory = manage_memory(snap, cfg, now)         # evictions, background copy-backs
    choice = route(snap, "llama2-7b", cfg, now)    # instance id, HOLD or REJECT
"""

from lambdascale.control.autoscaler import autoscale, autoscale_model, model_load
from lambdascale.control.controller import ActionError, Actuator, Controller, Decisions, TickResult
from lambdascale.control.decisions import (
    CopyBack,
    EvictReason,
    Eviction,
    MemoryPlan,
    RejectReason,
    RouteDecision,
    RouteKind,
    ScaleDecision,
    ScalePlan,
    ScaleReason,
    Source,
    Target,
)
from lambdascale.control.memory import manage_memory
from lambdascale.control.observe import ArrivalWindow, Ewma
from lambdascale.control.placement import place, place_all, place_model
from lambdascale.control.router import Assignment, DispatchResult, QueuedRequest, Waiting, dispatch, route, route_many, route_model
from lambdascale.control.settings import ControlSettings, MulticastAlgo, RouteMetric
from lambdascale.control.snapshot import ClusterSnapshot, Holding, InstanceView, ModelView, NodeView, Stage
from lambdascale.control.spec import CACHE_TIERS, SOURCE_TIERS, DeploymentSpec, InstanceState, SnapshotError, Tier
from lambdascale.control.timeline import ScaleTimeline

__all__ = [
    "CACHE_TIERS", "SOURCE_TIERS", "ActionError", "Actuator", "ArrivalWindow", "Ewma", "ClusterSnapshot", "ControlSettings",
    "Controller", "CopyBack", "Decisions", "DeploymentSpec", "EvictReason", "Eviction", "Holding",
    "InstanceState", "InstanceView", "MemoryPlan", "ModelView", "MulticastAlgo", "NodeView",
    "RejectReason", "RouteDecision", "RouteKind", "RouteMetric", "ScaleDecision", "ScalePlan",
    "ScaleReason", "ScaleTimeline", "SnapshotError", "Source", "Stage", "Target", "TickResult", "Tier",
    "autoscale", "autoscale_model", "manage_memory", "model_load", "place", "place_all", "place_model",
    "route", "route_many", "route_model", "dispatch", "DispatchResult", "QueuedRequest", "Waiting", "Assignment",
]
