"""Contract with the λPipe planners: our algo names are theirs, and a ScalePlan feeds plan_multicast."""

from __future__ import annotations

import pytest

from .control_factories import hold, model, node, snap
from lambdascale.control import ControlSettings, MulticastAlgo, Tier, place_model
from lambdascale.pipe.multicast import plan_multicast
from lambdascale.pipe.multicast_plan import Algo


def test_algo_names_match_the_planner() -> None:
    assert {a.value for a in MulticastAlgo} == {a.value for a in Algo}


@pytest.mark.parametrize("algo", list(MulticastAlgo))
def test_scale_plan_drives_plan_multicast(algo: MulticastAlgo) -> None:
    nodes = (
        node(0, free=0, holdings=(hold("m", Tier.GPU),)),
        node(1, free=0, holdings=(hold("m", Tier.HOST),)),
        *(node(i) for i in range(2, 8)),
    )
    s = snap(nodes, (model("m"),))
    plan = place_model(s, s.models[0], 6, ControlSettings(placement_multicast_algo=algo), 0.0)
    order = plan.multicast_nodes()
    n_blocks, n_chunks = 4, 8
    mc = plan_multicast(plan.algo.value, len(order), len(plan.sources), n_blocks, n_chunks)
    received: dict[int, set[int]] = {}
    for rnd in mc.rounds:
        for send in rnd:
            received.setdefault(order[send.dst], set()).add(send.chunk)
    # Every network target (cluster ids, mapped back through ``order``) gets every chunk.
    assert set(received) == set(plan.network_targets) == {2, 3, 4, 5, 6, 7}
    assert all(v == set(range(n_chunks)) for v in received.values())
