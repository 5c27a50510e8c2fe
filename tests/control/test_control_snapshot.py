"""Snapshot contract: validation errors name the object and field; helpers; settings bounds."""

from __future__ import annotations

import re

import pytest

from .control_factories import hold, inst, model, node, snap
from lambdascale.control import (
    ClusterSnapshot,
    ControlSettings,
    DeploymentSpec,
    Holding,
    InstanceState,
    InstanceView,
    RouteDecision,
    RouteKind,
    ScaleDecision,
    ScalePlan,
    SnapshotError,
    Source,
    Stage,
    Target,
    Tier,
)
from lambdascale.errors import LambdaScaleError


def test_tier_order() -> None:
    assert [t.rank for t in (Tier.GPU, Tier.HOST, Tier.SSD, Tier.NONE)] == [0, 1, 2, 3]
    assert Tier.GPU.faster_than(Tier.HOST) and not Tier.SSD.faster_than(Tier.HOST)
    assert sorted([Tier.NONE, Tier.SSD, Tier.GPU, Tier.HOST]) == [Tier.GPU, Tier.HOST, Tier.SSD, Tier.NONE]
    assert Tier.GPU < Tier.NONE and max(Tier.HOST, Tier.SSD) is Tier.SSD and Tier("host") == "host"


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: DeploymentSpec(min_instances=3, max_instances=2), "max_instances=2"),
        (lambda: DeploymentSpec(target_concurrency=0), "target_concurrency=0"),
        (lambda: DeploymentSpec(cache_tiers=("host", "nvme")), "cache_tiers=['host', 'nvme']"),
        (lambda: DeploymentSpec(cache_tiers=("host", "host")), "duplicates"),
        (lambda: DeploymentSpec(max_instances=0, scale_to_zero=False), "scale_to_zero"),
        (lambda: node(0, gpus=1, free=2), "NodeView(id=0): gpus_free=2"),
        (lambda: node(1, host_gb=1, host_free_gb=2), "host_bytes_free"),
        (lambda: node(0, holdings=(hold("m", Tier.HOST), hold("m", Tier.HOST))), "two holdings of 'm'"),
        (lambda: Holding("m", Tier.NONE, 1), "tier none"),
        (lambda: Stage(0, 2, 2), "block range"),
        (lambda: InstanceView("x", "m", InstanceState.FULL, (Stage(0, 0, 2), Stage(1, 3, 4))), "contiguous"),
        (lambda: model("m", (inst("a", "other"),)), "belongs to model 'other'"),
        (lambda: model("m", queue_len=-1), "queue_len=-1"),
        (lambda: snap((node(0), node(0)), ()), "duplicate node ids"),
        (lambda: snap((node(0),), (model("m", (inst("a", nodes=(5,)),)),)), "unknown node 5"),
        (lambda: ScaleDecision("m", 1, 3, add=1), "desired"),
        (lambda: RouteDecision(RouteKind.INSTANCE), "instance_id"),
    ],
)
def test_bad_input_names_the_field(build, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SnapshotError, match=re.escape(needle)) as err:
        build()
    assert isinstance(err.value, LambdaScaleError)


def test_spec_accepts_tier_strings() -> None:
    assert DeploymentSpec(cache_tiers=["gpu", "ssd"]).cache_tiers == (Tier.GPU, Tier.SSD)  # type: ignore[arg-type]


def test_spec_from_registration_mapping() -> None:
    row = {"name": "m", "min_instances": 1, "max_instances": 3, "target_concurrency": 2, "keep_alive_s": 5.0,
           "tiers": ["gpu", "host"]}
    spec = DeploymentSpec.from_mapping(row)
    assert (spec.min_instances, spec.max_instances, spec.cache_tiers) == (1, 3, (Tier.GPU, Tier.HOST))
    with pytest.raises(SnapshotError, match="unknown field 'replicas'"):
        DeploymentSpec.from_mapping({"replicas": 2})
    with pytest.raises(SnapshotError, match="min_instances=5"):
        DeploymentSpec.from_mapping({"min_instances": 5, "max_instances": 2})


def test_lookups_and_fastest_tier() -> None:
    n = node(0, holdings=(hold("m", Tier.SSD), hold("m", Tier.HOST), hold("p", Tier.GPU, blocks=frozenset({1}))))
    s = ClusterSnapshot(nodes=(n,), models=(model("m"),))
    assert n.fastest_tier("m") is Tier.HOST
    assert n.fastest_tier("p") is Tier.NONE  # partial copies do not count
    assert s.model("zz") is None and s.model("m") is not None
    with pytest.raises(KeyError, match="no node 3"):
        s.node(3)


def test_scale_plan_multicast_numbering() -> None:
    plan = ScalePlan("m", (Target(4, Tier.NONE), Target(2, Tier.HOST), Target(7, Tier.NONE)), (Source(9, Tier.GPU),))
    assert plan.network_targets == (4, 7)
    assert plan.multicast_nodes() == (9, 4, 7)
    assert [t.node for t in plan.local_targets] == [2]


def test_settings_bounds_rejected() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="router_max_held"):
        ControlSettings(router_max_held=-1)
    with pytest.raises(ValidationError, match="placement_multicast_algo"):
        ControlSettings(placement_multicast_algo="carrier-pigeon")  # type: ignore[arg-type]


def test_settings_round_trip_through_config_tree() -> None:
    from lambdascale.config import describe_config, load_config

    cfg = load_config(overrides={"control.placement_multicast_algo": "faasnet", "control.router_metric": "tokens"})
    assert cfg.control.placement_multicast_algo.value == "faasnet"
    docs = {k: d for k, _, d in describe_config() if k.startswith("control.")}
    assert docs and all(docs.values())  # every knob documented
