"""Node loss in the simulator (issue 20): nodes pause and crash, are declared dead by the runtime's
membership rules, and return as new incarnations, which the policies use again; on the shared
cluster a node loses and regains every model it held (a one-model run is a one-entry catalogue)."""

from __future__ import annotations

import numpy as np
import pytest

from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import Tier
from lambdascale.errors import LambdaScaleError
from lambdascale.membership import MemberState
from lambdascale.sim.catalogue import SimEntry
from lambdascale.sim.cluster import load_cluster, resolve_model
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.faults import parse_faults
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.state import Inst, Req
from lambdascale.sim.systems import SYSTEMS, SystemKind
from lambdascale.sim.workload import Workload


def _sim(faults: str, n: int = 200) -> Simulation:
    # a steady stream that keeps min_instances=2 instances busy for 100 s
    w = Workload("steady", np.linspace(0.0, 100.0, n), np.full(n, 64), np.full(n, 64))
    settings = SimSettings(nodes=3, min_instances=2, node_faults=faults, keep_alive_s=1000.0)
    return Simulation(w, load_cluster("h800-ib400"), resolve_model("llama2-7b"), SYSTEMS[SystemKind("lambdascale")],
                      settings, ControlSettings(), CostModel.constant(32, 1e-3, 2e-4))


def test_a_paused_and_a_crashed_node_are_declared_dead_and_return_to_serve() -> None:
    sim = _sim("pause@20:0+10,crash@50:1")
    r = sim.run()
    assert r.unfinished == 0  # every request finished, moved ones included
    ev = [(round(t, 2), n, inc, st) for t, n, inc, st in sim.member_events]
    # the pause: silent at 20, dead after the 5 s heartbeat limit, back when continued (+ rejoin)
    assert (25.0, 0, 1, MemberState.DEAD) in ev and (30.2, 0, 2, MemberState.ALIVE) in ev
    # the crash: dead at once (its channel closes), back after backoff + agent start, with its SSD copy only
    assert (50.0, 1, 1, MemberState.DEAD) in ev and (53.5, 1, 2, MemberState.ALIVE) in ev
    assert sim.migrations >= 1
    # both came back into use: the controller placed instances on them again
    later = [e for e in r.scale_events if e.timeline.decided_at > 30.2]
    placed = {n for e in later for n in e.timeline.targets}
    assert placed & {0, 1}, [e.timeline.targets for e in r.scale_events]


def test_a_short_pause_only_delays_the_node() -> None:
    base = _sim("").run()
    sim = _sim("pause@20:0+2")
    r = sim.run()
    assert not sim.member_events and r.unfinished == 0 and sim.migrations == base.migrations


def test_bad_fault_specs_name_the_entry() -> None:
    with pytest.raises(LambdaScaleError, match="'oops@1:0'"):
        parse_faults("oops@1:0", 3)
    with pytest.raises(LambdaScaleError, match="node must be in"):
        parse_faults("crash@1:7", 3)


def test_a_node_holding_two_models_loses_and_regains_both() -> None:
    # two catalogue models, each with min_instances=2 warm instances on nodes 0 and 1: node 0 runs both
    cost = CostModel.constant(32, 1e-3, 2e-4)
    entries = [SimEntry(resolve_model("llama2-7b"), cost, 0.5), SimEntry(resolve_model("llama3-8b"), cost, 0.5)]
    names = {e.model.name for e in entries}
    n = 200
    w = Workload("steady2", np.linspace(0.0, 100.0, n), np.full(n, 64), np.full(n, 64),
                 model=np.arange(n, dtype=np.int64) % 2)
    settings = SimSettings(nodes=3, min_instances=2, node_faults="pause@20:0+10,crash@50:0", keep_alive_s=1000.0)
    sim = Simulation(w, load_cluster("h800-ib400"), entries, SYSTEMS[SystemKind("lambdascale")], settings,
                     ControlSettings())
    seen: list[tuple[float, int, MemberState, set[str], dict[str, set[Tier]]]] = []
    set_member = sim._set_member

    def spy(node: int, state: MemberState) -> None:  # what node 0 holds at each change, as the controller sees it
        set_member(node, state)
        running = {i.m.name for i in sim.insts.values() if node in i.nodes} | set(sim.nodes[node].insts)
        tiers: dict[str, set[Tier]] = {}
        for h in sim._node_view(sim.nodes[node]).holdings:
            if h.complete:
                tiers.setdefault(h.model, set()).add(h.tier)
        seen.append((round(sim.loop.now(), 2), sim.incarnation[node], state, running, tiers))

    sim._set_member = spy  # type: ignore[method-assign]
    stopped: list[tuple[float, str, tuple[int, ...]]] = []
    stop = sim._stop

    def stop_spy(inst: Inst) -> list[Req]:
        stopped.append((round(sim.loop.now(), 2), inst.m.name, inst.nodes))
        return stop(inst)

    sim._stop = stop_spy  # type: ignore[method-assign]
    r = sim.run()
    assert r.unfinished == 0
    at = {(t, st): (inc, run, tiers) for t, inc, st, run, tiers in seen}
    # stopped at the pause: neither model runs there any more, until it returns
    assert at[(20.0, MemberState.SUSPECT)][1] == set() and at[(25.0, MemberState.DEAD)][1] == set()
    # back from the pause as incarnation 2 with both models' device, host and SSD copies
    inc, run, tiers = at[(30.2, MemberState.ALIVE)]
    assert inc == 2 and run == set() and set(tiers) == names
    assert all(tiers[m] == {Tier.GPU, Tier.HOST, Tier.SSD} for m in names), tiers
    # the crash: back as incarnation 3 with both models' SSD copies only
    inc, run, tiers = at[(53.5, MemberState.ALIVE)]
    assert inc == 3 and run == set() and tiers == {m: {Tier.SSD} for m in names}, tiers
    # the pause stopped node 0's instances of both models
    assert {name for t, name, nodes in stopped if t == 20.0 and nodes == (0,)} == names, stopped
