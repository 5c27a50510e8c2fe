"""The simulated gateway: late binding (a backlog waits at the gateway and drains onto new
capacity) and the scale-from-zero kick, for every system alike."""

from __future__ import annotations

import numpy as np
import pytest

from lambdascale.control.settings import ControlSettings
from lambdascale.sim.cluster import load_cluster, resolve_model
from lambdascale.sim.costmodel import CostModel
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.state import Inst, prefill_tokens
from lambdascale.sim.systems import SYSTEMS, SystemKind
from lambdascale.sim.workload import Workload

PREFILL, DECODE = 1e-3, 2e-4  # seconds per layer (constant cost model, 32 layers)
STEP = 32 * PREFILL


class _Checked(Simulation):
    """Asserts the dispatch invariants at every step start and records which instance served whom."""

    served_by: dict[int, str]

    def _start_step(self, inst: Inst) -> None:
        late = self.cfg.router_late_binding
        assert inst.outstanding <= inst.capacity
        if late and len(inst.pending) > 1:
            # one step's budget per step in flight (a pipeline's micro-batches)
            assert sum(prefill_tokens(r) for r in inst.pending) <= self.cfg.router_max_waiting_tokens * inst.slots
        super()._start_step(inst)
        for r in inst.seg_new:
            self.served_by.setdefault(r.idx, inst.id)


def _sim(w: Workload, system: str = "serverlessllm", **kw: object) -> _Checked:
    settings = SimSettings(**{"nodes": 2, "min_instances": 1, "target_concurrency": 2,
                              "max_prefill_tokens": 64, **kw})  # type: ignore[arg-type]
    sim = _Checked(w, load_cluster("h800-ib400"), resolve_model("llama2-7b"), SYSTEMS[SystemKind(system)],
                   settings, ControlSettings(), CostModel.constant(32, PREFILL, DECODE))
    sim.served_by = {}
    return sim


def _burst(n: int = 40) -> Workload:
    # n requests at once, each filling one prefill step (64 tokens, the step budget).
    return Workload("burst", np.zeros(n), np.full(n, 64), np.full(n, 4))


@pytest.mark.parametrize("system", ["serverlessllm", "lambdascale"])
def test_backlog_drains_onto_the_new_instance_as_soon_as_it_is_full(system: str) -> None:
    sim = _sim(_burst(), system)
    r = sim.run()
    assert r.unfinished == 0
    full_at = min(t for e in r.scale_events for t in e.timeline.node_full_at.values())
    new = {iid for iid in sim.served_by.values() if iid != "llama2-7b-i1"}
    assert new, "the new instance served nothing"
    first_on_new = min(r.ttft[i] for i, iid in sim.served_by.items() if iid in new)
    # The held backlog is dispatched the instant the node is full; its first step is one prefill.
    assert first_on_new == pytest.approx(full_at + STEP)
    # Half the backlog (or close) moved: the warm instance no longer owns everything that arrived.
    on_new = sum(1 for iid in sim.served_by.values() if iid in new)
    assert on_new >= 10


def test_late_binding_lowers_the_tail_against_early_binding() -> None:
    late = _sim(_burst()).run()
    early_sim = _sim(_burst(), late_binding=False)
    early = early_sim.run()
    # Early binding puts the burst in the warm instance's queue (capacity 32): the new instance
    # only gets what arrived beyond 32 slots.
    assert sum(1 for iid in early_sim.served_by.values() if iid == "llama2-7b-i1") >= 32
    assert np.max(late.ttft) < np.max(early.ttft)


def test_queued_work_never_exceeds_slots_with_pipelines_and_migrations() -> None:
    # 2 warm sources multicast to 4 new nodes; λPipe pipelines form, serve and dissolve (their
    # requests migrate). The checked subclass asserts slots and step budgets at every step.
    n = 200
    w = Workload("ramp", np.linspace(0.0, 2.0, n), np.full(n, 48), np.full(n, 30))
    sim = _sim(w, "lambdascale", nodes=6, min_instances=2, host_cache_nodes=0)
    r = sim.run()
    assert r.unfinished == 0 and np.all(r.ttft > 0)
    assert r.scale_events[0].n_sources == 2
    assert any("-p" in iid for iid in sim.served_by.values())  # a pipeline took backlog work
    assert r.migrations > 0
    again = _sim(w, "lambdascale", nodes=6, min_instances=2, host_cache_nodes=0).run()
    assert np.array_equal(r.ttft, again.ttft) and r.gpu_seconds == again.gpu_seconds  # deterministic


@pytest.mark.parametrize("kick", [True, False])
def test_scale_from_zero_kick_decides_at_the_arrival(kick: bool) -> None:
    # One request at t=0.1; periodic ticks run at 0.0, 0.5, ... (autoscale_interval_s=0.5).
    w = Workload("one", np.array([0.1]), np.array([64]), np.array([2]))
    r = _sim(w, min_instances=0, kick_from_zero=kick).run()
    assert r.scale_events[0].timeline.decided_at == pytest.approx(0.1 if kick else 0.5)
    assert r.unfinished == 0


def test_kick_only_when_no_instance_exists() -> None:
    # With a warm instance the arrival never triggers an extra pass: same decisions as without.
    w = _burst(12)
    a, b = _sim(w).run(), _sim(w, kick_from_zero=False).run()
    assert [e.timeline.decided_at for e in a.scale_events] == [e.timeline.decided_at for e in b.scale_events]
    assert np.array_equal(a.ttft, b.ttft)


def test_cli_switches_reach_the_simulation(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from lambdascale.sim import cli

    def run(*flags: str) -> dict[str, object]:
        p = argparse.ArgumentParser(prog="lambdascale")
        cli.register(p.add_subparsers(dest="command", required=True))
        args = p.parse_args(["simulate", "--trace", "synthetic:onoff,rate=20,duration_s=20", "--model", "7b",
                             "--nodes", "2", "--systems", "serverlessllm", "--json", "--no-progress", *flags])
        assert args.func(args) in (0, None)
        return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]

    on, off = run(), run("--no-late-binding", "--no-kick-from-zero")
    assert on["config"]["sim"]["late_binding"] is True and on["config"]["sim"]["kick_from_zero"] is True  # type: ignore[index]
    assert off["config"]["sim"]["late_binding"] is False and off["config"]["sim"]["kick_from_zero"] is False  # type: ignore[index]
    # The kick decides the first scale-out at the first arrival; without it, at a tick (k x 0.5 s).
    t_on = on["systems"][0]["scale_event_list"][0]["decided_at"]  # type: ignore[index]
    t_off = off["systems"][0]["scale_event_list"][0]["decided_at"]  # type: ignore[index]
    assert t_on < t_off and t_off == pytest.approx(round(t_off / 0.5) * 0.5)
