"""Late binding: ``router.dispatch`` assigns the gateway's FIFO queue to instances that can start
the work in their next step; new capacity drains the backlog; slots are never overfilled."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .control_factories import inst, model
from lambdascale.control import ControlSettings, InstanceState, route_model
from lambdascale.control.router import QueuedRequest, Waiting, dispatch, fits_next_step, work_tokens

LATE = ControlSettings(router_late_binding=True, router_max_waiting_tokens=1000)
EARLY = ControlSettings()


def _q(*tokens: int) -> list[QueuedRequest]:
    return [QueuedRequest(f"r{k}", t, t + 10) for k, t in enumerate(tokens)]


def test_early_binding_fills_free_slots_like_route_model() -> None:
    m = model(instances=(inst("a", capacity=2, busy=1), inst("b", nodes=(1,), capacity=2, busy=0)))
    out = dispatch(_q(500, 500, 500, 500), m, EARLY, 0.0)
    # b (least loaded) first, as route_model chooses; then the three free slots fill; the fourth waits.
    assert out.assignments[0].instance_id == route_model(m, EARLY, 0.0).instance_id == "b"
    assert [a.instance_id for a in out.assignments] == ["b", "a", "b"] and out.held == 1


def test_late_binding_holds_work_an_instance_cannot_start_next_step() -> None:
    m = model(instances=(inst("a", capacity=8, busy=3),))
    # 800 tokens already wait at a: 300 more would exceed the 1000-token step budget.
    out = dispatch(_q(300, 100), m, LATE, 0.0, waiting={"a": Waiting(2, 800)})
    assert out.assignments == () and out.held == 2
    # Early binding would have bound both to a's queue.
    assert len(dispatch(_q(300, 100), m, EARLY, 0.0).assignments) == 2


def test_idle_instance_takes_a_prompt_longer_than_the_budget_alone() -> None:
    m = model(instances=(inst("a", capacity=8),))
    out = dispatch(_q(5000, 10), m, LATE, 0.0)
    assert [a.request_id for a in out.assignments] == ["r0"] and out.held == 1


def test_a_pipeline_has_a_prefill_budget_per_step_in_flight() -> None:
    from dataclasses import replace

    pipe = replace(inst("p", nodes=(1, 2, 3, 4), state=InstanceState.PIPELINED, capacity=32), step_slots=4)
    out = dispatch(_q(*[400] * 12), model(instances=(pipe,)), LATE, 0.0)
    # four micro-batches each start up to 1000 prompt tokens: ten 400-token prompts fit, not two
    assert len(out.assignments) == 10 and out.held == 2
    one = dispatch(_q(*[400] * 12), model(instances=(replace(pipe, step_slots=1),)), LATE, 0.0)
    assert len(one.assignments) == 2
    with pytest.raises(ValueError, match="step_slots=0 must be >= 1"):
        replace(pipe, step_slots=0)


def test_fifo_no_overtaking() -> None:
    m = model(instances=(inst("a", capacity=8, busy=1),))
    out = dispatch(_q(900, 50), m, LATE, 0.0, waiting={"a": Waiting(1, 200)})
    # r0 does not fit; r1 would, but must not overtake the older request.
    assert out.assignments == () and out.held == 2


def test_backlog_drains_onto_a_new_instance_at_once() -> None:
    busy = inst("a", capacity=8, busy=2)
    q = _q(600, 600, 600, 600)
    before = dispatch(q, model(instances=(busy,)), LATE, 0.0, waiting={"a": Waiting(1, 900)})
    assert before.assignments == ()
    # An instance that was loading becomes routable: the backlog goes to it (and the pipeline's
    # loading sibling still gets nothing).
    m = model(instances=(busy, inst("new", nodes=(1,), capacity=8),
                         inst("l", nodes=(2,), state=InstanceState.LOADING)))
    after = dispatch(q, m, LATE, 1.0, waiting={"a": Waiting(1, 900)})
    assert [a.instance_id for a in after.assignments] == ["new"] and after.held == 3
    # A λPipe pipeline appearing is capacity too.
    p = model(instances=(busy, inst("p", nodes=(1, 2), state=InstanceState.PIPELINED, capacity=8)))
    assert [a.instance_id for a in dispatch(q, p, LATE, 1.0, waiting={"a": Waiting(1, 900)}).assignments] == ["p"]


def test_burst_spreads_over_idle_instances() -> None:
    m = model(instances=tuple(inst(f"i{k}", nodes=(k,), capacity=4) for k in range(3)))
    out = dispatch(_q(*([400] * 6)), m, LATE, 0.0)
    ids = [a.instance_id for a in out.assignments]
    assert len(ids) == 6 and all(ids.count(f"i{k}") == 2 for k in range(3))


def test_bad_token_count_is_named() -> None:
    with pytest.raises(ValueError, match="queued request 'x'.*prompt_tokens=-1"):
        QueuedRequest("x", -1)


@settings(max_examples=60, deadline=None)
@given(
    caps=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6), st.integers(0, 1500)), min_size=0, max_size=4),
    toks=st.lists(st.integers(1, 3000), min_size=0, max_size=20),
    late=st.booleans(),
)
def test_dispatch_never_overfills_slots_or_budgets_and_is_deterministic(caps, toks, late) -> None:  # type: ignore[no-untyped-def]
    insts = tuple(inst(f"i{k}", nodes=(k,), capacity=c, busy=min(b, c)) for k, (c, b, _) in enumerate(caps))
    waiting = {f"i{k}": Waiting(1, w) for k, (_, _, w) in enumerate(caps) if w}
    m = model(instances=insts)
    cfg = LATE if late else EARLY
    q = _q(*toks)
    out = dispatch(q, m, cfg, 0.0, waiting)
    assert out == dispatch(q, m, cfg, 0.0, waiting)
    assert [a.request_id for a in out.assignments] == [r.id for r in q[: len(out.assignments)]]  # a FIFO prefix
    assert out.held == len(q) - len(out.assignments)
    by_id = {r.id: r for r in q}
    for i in insts:
        got = [by_id[a.request_id] for a in out.assignments if a.instance_id == i.id]
        assert i.outstanding_requests + len(got) <= i.capacity
        if late and got:
            w0 = waiting.get(i.id, Waiting()).prompt_tokens
            total = w0 + sum(r.prompt_tokens for r in got)
            # within the budget, except one request taken by an instance with nothing waiting
            assert total <= cfg.router_max_waiting_tokens or (w0 == 0 and len(got) == 1)


def test_fits_next_step_is_the_per_step_prefill_budget_of_late_binding() -> None:
    assert fits_next_step(Waiting(), 5000, 1, LATE)            # nothing waiting: a long prompt runs alone
    assert fits_next_step(Waiting(1, 600), 400, 1, LATE)       # 1000 tokens: within one step's budget
    assert not fits_next_step(Waiting(1, 600), 401, 1, LATE)
    assert fits_next_step(Waiting(2, 1500), 500, 2, LATE)      # two micro-batches: two steps' budgets
    assert fits_next_step(Waiting(1, 10**6), 10**6, 1, EARLY)  # early binding: any free slot


def test_a_queued_request_counts_its_prefill_and_what_it_may_still_generate() -> None:
    fresh = QueuedRequest.of("a", 100, 20)
    assert (fresh.prompt_tokens, fresh.total_tokens) == (100, 120)
    # resumed after 5 of 20 outputs: it re-prefills prompt + 5 and may generate 15 more
    resumed = QueuedRequest.of("b", 105, 15)
    assert (resumed.prompt_tokens, resumed.total_tokens) == (105, 120)
    assert QueuedRequest.of("c", 100, -3).total_tokens == 100  # past max_tokens: nothing left to generate
    assert work_tokens(1, 9) == 10  # a running sequence: its next decode and the rest
    with pytest.raises(ValueError, match="tokens to compute must be >= 0"):
        work_tokens(-1, 3)


def test_with_the_tokens_metric_a_resumed_request_weighs_its_recompute() -> None:
    from lambdascale.control.settings import RouteMetric

    cfg = ControlSettings(router_metric=RouteMetric.TOKENS)
    m = model(instances=(inst("a", capacity=8), inst("b", nodes=(1,), capacity=8)))
    # a 100-token prompt resumed after 500 of 510 outputs re-prefills 600 tokens: it weighs 610,
    # more than a fresh 300-token request (310), so the next fresh one goes to b, not to a
    q = [QueuedRequest.of("resumed", 100 + 500, 510 - 500), QueuedRequest.of("f1", 300, 10),
         QueuedRequest.of("f2", 300, 10)]
    assert [x.instance_id for x in dispatch(q, m, cfg, 0.0).assignments] == ["a", "b", "b"]
    # counted as prompt + outputs left only (110), it would have looked lighter than f1
    light = [QueuedRequest("resumed", 600, 110), *q[1:]]
    assert [x.instance_id for x in dispatch(light, m, cfg, 0.0).assignments] == ["a", "b", "a"]
