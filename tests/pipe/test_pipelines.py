"""Pipeline planner: hand-checked cases, policy rules, incremental == pure, properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.pipe import Pipeline, PipelinePlanner, PlanError, Stage, plan_multicast, plan_pipelines, planned_sizes
from lambdascale.pipe.report import pipeline_ticks

ALL8 = set(range(8))


def test_planned_sizes_halve_from_the_block_count() -> None:
    assert planned_sizes(8, 7) == (4, 2, 1)
    assert planned_sizes(8, 8) == (8,)
    assert planned_sizes(8, 15) == (8, 4, 2, 1)
    assert planned_sizes(8, 3) == (2, 1)
    assert planned_sizes(6, 5) == (3, 1, 1)
    assert planned_sizes(8, 20) == (8, 4, 4, 2, 1, 1)  # a second pass once the first is placed
    assert planned_sizes(8, 0) == ()


def test_large_clusters_run_several_pipelines_of_a_size() -> None:
    # 8 nodes each holding one quarter (two per quarter): two 4-node pipelines at once
    h = {v: {2 * (v % 4), 2 * (v % 4) + 1} for v in range(8)}
    p = plan_pipelines(h, 8, sizes=(4, 4))
    assert sorted(q.assignment for q in p.form) == [(0, 0, 1, 1, 2, 2, 3, 3), (4, 4, 5, 5, 6, 6, 7, 7)]
    assert plan_pipelines(h, 8, sizes=(4,)).instances == 1


def test_hand_checked_seven_receivers() -> None:
    # nodes 2..5 each hold a quarter, 0 and 1 a half, 6 everything: 6 serves alone, a 4-node
    # pipeline on the quarter holders, a 2-node one on the half holders (richer nodes are kept
    # for the smaller pipeline).
    h = {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}, 2: {0, 1}, 3: {2, 3}, 4: {4, 5}, 5: {6, 7}, 6: ALL8}
    p = plan_pipelines(h, 8)
    assert p.planned == (4, 2, 1)
    assert p.solo == (6,)
    assert [q.assignment for q in p.form] == [(2, 2, 3, 3, 4, 4, 5, 5), (0, 0, 0, 0, 1, 1, 1, 1)]
    assert p.form[0].stages == (Stage(0, 2, 2), Stage(2, 4, 3), Stage(4, 6, 4), Stage(6, 8, 5))
    assert p.instances == 3


def test_interleaved_blocks_form_a_pipeline_that_revisits_nodes() -> None:
    # two sources dealt blocks round-robin: node 0 holds even blocks, node 1 odd ones
    p = plan_pipelines({0: {0, 2}, 1: {1, 3}}, 4)
    assert [q.assignment for q in p.form] == [(0, 1, 0, 1)]
    assert p.form[0].size == 2 and p.form[0].loads() == {0: 2, 1: 2}


def test_no_pipeline_when_a_block_is_missing_or_loads_cannot_balance() -> None:
    assert plan_pipelines({0: {0, 1}, 1: {1, 2}}, 4).form == ()
    # 2 nodes, 4 blocks: a balanced split needs 2 blocks each, node 1 holds only block 3
    assert plan_pipelines({0: {0, 1, 2}, 1: {3}}, 4).form == ()


def test_capacity_excludes_and_limits_nodes() -> None:
    h = {0: {0, 1}, 1: {2, 3}, 2: {0, 1, 2, 3}}
    assert plan_pipelines(h, 4, sizes=(2,)).form[0].assignment == (0, 0, 1, 1)
    assert plan_pipelines(h, 4, sizes=(2,)).solo == (2,)
    # node 2 lacks capacity for the whole model: it is no longer solo and may be a stage
    p = plan_pipelines(h, 4, capacity={2: 2, 0: 0}, sizes=(2,))
    assert p.solo == ()
    assert p.form[0].assignment == (2, 2, 1, 1)
    assert plan_pipelines(h, 4, capacity={0: 1, 2: 1}, sizes=(2,)).form == ()


def test_dissolve_when_a_member_can_serve_alone_and_keep_otherwise() -> None:
    h = {0: {0, 1}, 1: {2, 3}, 2: {0}, 3: {1, 2, 3}}
    first = plan_pipelines(h, 4)  # planned_sizes(4, 4) == (4,): one block per node
    assert first.form and first.form[0].size == 4
    running = first.active
    h2 = {**h, 2: {0, 1}}  # nothing relevant: keep
    again = plan_pipelines(h2, 4, current=running)
    assert again.keep == running and again.form == () and again.dissolve == ()
    h3 = {**h2, 0: {0, 1, 2, 3}}  # node 0 holds everything: it leaves to serve alone
    third = plan_pipelines(h3, 4, current=running)
    assert third.dissolve == running and third.solo == (0,)


def test_bad_inputs_name_the_node_and_block() -> None:
    with pytest.raises(PlanError, match="node 3: block 9"):
        plan_pipelines({3: {9}}, 8)
    with pytest.raises(PlanError, match="capacity of node 1"):
        plan_pipelines({1: {0}}, 8, capacity={1: -1})
    with pytest.raises(PlanError, match=r"sizes \[9\] outside 1\.\.n_blocks=8"):
        plan_pipelines({1: {0}}, 8, sizes=(4, 9))
    planner = PipelinePlanner([0, 1], 2, 4)
    with pytest.raises(PlanError, match="node 5"):
        planner.on_chunk(5, 0)
    with pytest.raises(PlanError, match="chunk 4"):
        planner.on_chunk(0, 4)


def test_incremental_planner_counts_chunks_into_blocks() -> None:
    planner = PipelinePlanner([0, 1], 2, 4)  # blocks: {0, 1} and {2, 3}
    assert planner.on_chunk(0, 0) is None
    assert planner.on_chunk(0, 0) is None  # duplicate arrival is ignored
    assert planner.holdings()[0] == set()
    assert planner.on_chunk(1, 2) is None
    assert planner.on_chunk(0, 1) is None
    res = planner.on_chunk(1, 3)
    assert res is not None and [p.assignment for p in res.form] == [(0, 1)]
    planner.on_chunk(0, 2)
    res = planner.on_chunk(0, 3)
    assert res is not None and res.solo == (0,) and res.dissolve[0].assignment == (0, 1)


# ---- properties --------------------------------------------------------------------------------

def _check_valid(plan, holdings, n_blocks, capacity=None) -> None:
    capacity = capacity or {}
    seen: set[int] = set()
    for p in plan.active:
        assert len(p.assignment) == n_blocks  # covers every block, in order
        for b, v in enumerate(p.assignment):
            assert b in holdings[v]
        loads = p.loads()
        assert max(loads.values()) - min(loads.values()) <= 1
        assert all(capacity.get(v, n_blocks) >= n for v, n in loads.items())
        assert not seen & set(loads)  # disjoint pipelines
        seen |= set(loads)
        assert p.size >= 2
    assert not seen & set(plan.solo)
    for v in plan.solo:
        assert holdings[v] == set(range(n_blocks))


holdings_st = st.integers(1, 8).flatmap(
    lambda b: st.tuples(
        st.just(b),
        st.dictionaries(st.integers(0, 40), st.sets(st.integers(0, b - 1)), min_size=1, max_size=24),
        st.dictionaries(st.integers(0, 40), st.integers(0, 8), max_size=6),
    )
)


@settings(max_examples=150, deadline=None)
@given(holdings_st)
def test_pipelines_are_valid_and_disjoint(case) -> None:
    b, holdings, capacity = case
    plan = plan_pipelines(holdings, b, capacity=capacity)
    _check_valid(plan, holdings, b, capacity)
    # the planner is deterministic and idempotent: fed its own answer, it changes nothing
    again = plan_pipelines(holdings, b, capacity=capacity, current=plan.active)
    assert again.form == () and again.dissolve == () and again.keep == plan.active


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 24), s=st.integers(1, 4), b=st.sampled_from([2, 4, 8]), mult=st.integers(1, 3),
       algo=st.sampled_from(["binomial", "faasnet", "ring"]))
def test_incremental_equals_pure_along_a_multicast(n: int, s: int, b: int, mult: int, algo: str) -> None:
    s = min(s, n)
    plan = plan_multicast(algo, n, s, b, b * mult)
    planner = PipelinePlanner(plan.receiver_nodes, b, b * mult)
    current: tuple[Pipeline, ...] = ()
    for t, rnd in enumerate(plan.rounds, start=1):
        for snd in rnd:
            planner.on_chunk(snd.dst, snd.chunk)
        holdings = plan.holdings_at(t)
        assert planner.holdings() == holdings
        _check_valid(planner.plan, holdings, b)
        current = planner.plan.active
    if plan.receiver_nodes:
        assert planner.plan.solo == plan.receiver_nodes and current == ()
    ticks = pipeline_ticks(plan)
    for pt in ticks:
        _check_valid(pt.plan, plan.holdings_at(pt.tick), b)


def test_pure_function_reproduces_each_incremental_step() -> None:
    plan = plan_multicast("binomial", 8, 2, 8, 16)
    planner = PipelinePlanner(plan.receiver_nodes, 8)
    masks: dict[int, set[int]] = {n: set() for n in plan.receiver_nodes}
    for _, node, block in plan.block_events():
        prev = planner.plan.active
        planner.on_block(node, block)
        masks[node].add(block)
        pure = plan_pipelines(masks, 8, current=prev)
        assert pure.active == planner.plan.active and pure.solo == planner.plan.solo


def test_assignment_prefers_fewer_hops() -> None:
    # every node holds every block but 1 (so no one is solo); the planner may place any block
    # anywhere and should return contiguous stages: 2 hops for a 3-node, 6-block pipeline
    h = {0: {0, 1, 2, 3, 4}, 1: {0, 1, 2, 3, 5}, 2: {1, 2, 3, 4, 5}}
    p = plan_pipelines(h, 6, sizes=(3,))
    (pipe,) = p.form
    assert len(pipe.stages) == 3 and all(st.n_blocks == 2 for st in pipe.stages)


def test_reference_two_sources_first_pipeline_at_tick_nine() -> None:
    from lambdascale.pipe.report import first_pipeline_tick, first_serving_tick

    plan = plan_multicast("binomial", 8, 2, 8, 16)
    assert first_pipeline_tick(plan) == 9 == plan.all_blocks_round
    one = plan_multicast("binomial", 8, 1, 8, 16)
    assert first_pipeline_tick(one) is None  # every block is first whole at completion
    assert first_serving_tick(one) == 18


# ---- dead nodes ------------------------------------------------------------------------------

def test_removing_a_pipeline_member_dissolves_it_and_builds_a_replacement() -> None:
    # 8 blocks; nodes 0..3 hold a quarter each, 4..7 a quarter each too: two 4-node pipelines
    # are possible, the planner (sizes=(4,)) runs one; when a member dies, the spare quarter
    # holders replace it at once.
    h = {v: {2 * (v % 4), 2 * (v % 4) + 1} for v in range(8)}
    planner = PipelinePlanner(range(8), 8, holdings=h, sizes=(4,))
    (first,) = planner.plan.active
    dead = first.assignment[0]
    res = planner.remove_node(dead)
    assert res is not None
    assert [p.assignment for p in res.dissolve] == [first.assignment]
    (repl,) = res.active
    assert dead not in repl.nodes and repl.size == 4
    assert dead not in planner.holdings()
    with pytest.raises(PlanError, match="already removed"):
        planner.remove_node(dead)
    with pytest.raises(PlanError, match=f"node {dead}"):
        planner.on_chunk(dead, 0)


def test_removing_a_node_outside_every_pipeline_changes_nothing() -> None:
    planner = PipelinePlanner([0, 1, 2], 2, 2, holdings={0: {0}, 1: {1}}, sizes=(2,))
    assert [p.assignment for p in planner.plan.active] == [(0, 1)]
    assert planner.remove_node(2) is None
    assert [p.assignment for p in planner.plan.active] == [(0, 1)]


def test_removing_a_solo_node_is_reported() -> None:
    planner = PipelinePlanner([0, 1], 2, 2, holdings={0: {0, 1}})
    assert planner.solo == (0,)
    res = planner.remove_node(0)
    assert res is not None and res.solo == () and planner.solo == ()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 16), s=st.integers(1, 3), b=st.sampled_from([2, 4, 8]),
       kills=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 15)), max_size=4),
       explicit=st.booleans())
def test_incremental_equals_pure_with_removals(n: int, s: int, b: int, kills, explicit: bool) -> None:
    """Along a multicast with nodes dying at random ticks, every incremental step equals the pure
    planner fed the previous running pipelines and the survivors' holdings."""
    s = min(s, n - 1)
    plan = plan_multicast("binomial", n, s, b, 2 * b)
    receivers = list(plan.receiver_nodes)
    sizes = planned_sizes(b, len(receivers)) if explicit else None
    planner = PipelinePlanner(receivers, b, 2 * b, sizes=sizes)
    dead: set[int] = set()
    kill_at: dict[int, list[int]] = {}
    for t, k in kills:
        kill_at.setdefault(t, []).append(receivers[k % len(receivers)])
    chunks: dict[int, set[int]] = {v: set() for v in receivers}
    for t, rnd in enumerate(plan.rounds, start=1):
        for snd in rnd:
            if snd.dst in dead:
                continue
            prev = planner.plan.active
            planner.on_chunk(snd.dst, snd.chunk)
            chunks[snd.dst].add(snd.chunk)
        for v in kill_at.get(t, []):
            if v in dead:
                continue
            prev = planner.plan.active
            planner.remove_node(v)
            dead.add(v)
            holdings = {u: {c * b // (2 * b) for c in cs if all(
                cc in cs for cc in range(2 * b) if cc * b // (2 * b) == c * b // (2 * b))}
                for u, cs in chunks.items() if u not in dead}
            pure = plan_pipelines(holdings, b, current=prev, sizes=sizes)
            assert pure.active == planner.plan.active and pure.solo == planner.plan.solo
            assert planner.holdings() == holdings
            assert all(v not in p.nodes for p in planner.plan.active)
            _check_valid(planner.plan, holdings, b)


# ---- helpers: sources lend their device to pipelines ------------------------------------------

def _check_assisted(plan, holdings, helpers, n_blocks) -> None:
    """Every pipeline covers the blocks in order on nodes holding them (helpers hold all), helpers
    stay within their room summed over pipelines, receivers are in one pipeline at most."""
    used: dict[int, int] = {}
    seen: set[int] = set()
    for p in plan.active:
        assert len(p.assignment) == n_blocks
        for b, v in enumerate(p.assignment):
            assert v in helpers or b in holdings[v]
        receivers = {v for v in p.nodes if v not in helpers}
        assert receivers and not seen & receivers
        seen |= receivers
        for v, n in p.loads().items():
            if v in helpers:
                used[v] = used.get(v, 0) + n
    assert all(used[v] <= helpers[v] for v in used)


def test_helpers_run_the_blocks_no_receiver_holds_yet() -> None:
    # two sources dealt complementary blocks; the receivers hold six of eight between them
    h = {2: {0, 1}, 3: {0}, 4: {4, 5, 6}, 5: {4, 5, 6}}
    assert plan_pipelines(h, 8).active == ()  # blocks 2, 3 and 7 are on no receiver
    plan = plan_pipelines(h, 8, helpers={0: 2, 1: 2})
    (p,) = plan.form
    _check_assisted(plan, h, {0: 2, 1: 2}, 8)
    assert {v for v in p.nodes if v not in (0, 1)} == {2, 3, 4, 5}  # the planned size counts receivers
    assert sorted(b for b, v in enumerate(p.assignment) if v in (0, 1)) == [2, 3, 7]
    assert p.assignment[2] == p.assignment[3]  # a run of helper blocks stays on one helper
    # too little room: 3 blocks missing, 2 lent
    assert plan_pipelines(h, 8, helpers={0: 1, 1: 1}).active == ()
    # a receiver-only pipeline is preferred whenever one exists
    full = {2: {0, 1, 2, 3}, 3: {0, 1, 2, 3}, 4: {4, 5, 6, 7}, 5: {4, 5, 6, 7}}
    (q,) = plan_pipelines(full, 8, helpers={0: 4, 1: 4}).form
    assert not {0, 1} & set(q.nodes)


def test_an_assisted_pipeline_is_kept_until_a_receiver_can_serve_alone() -> None:
    helpers = {0: 2, 1: 2}
    h = {2: {0, 1}, 3: {0}, 4: {4, 5, 6}, 5: {4, 5, 6}}
    (p,) = plan_pipelines(h, 8, helpers=helpers).form
    more = {**h, 3: {0, 1, 2, 3}, 5: {4, 5, 6, 7}}  # a receiver-only pipeline would fit now
    again = plan_pipelines(more, 8, helpers=helpers, current=(p,))
    assert again.keep == (p,) and again.form == ()
    done = {**more, 2: set(range(8))}
    last = plan_pipelines(done, 8, helpers=helpers, current=(p,))
    assert last.dissolve == (p,) and last.solo == (2,)


def test_kept_pipelines_use_up_the_helpers_room() -> None:
    h = {2: {0}, 3: {1}, 4: {0}, 5: {1}}
    plan = plan_pipelines(h, 4, sizes=(2, 2), helpers={0: 2})
    assert len(plan.form) == 1  # 2 blocks missing per pipeline, 2 lent in all
    _check_assisted(plan, h, {0: 2}, 4)
    plan2 = plan_pipelines(h, 4, sizes=(2, 2), helpers={0: 4})
    assert len(plan2.form) == 2
    _check_assisted(plan2, h, {0: 4}, 4)
    # fed back with less room, one of them no longer fits and dissolves
    plan3 = plan_pipelines(h, 4, sizes=(2, 2), helpers={0: 2}, current=plan2.active)
    assert len(plan3.keep) == 1 and len(plan3.dissolve) == 1


def test_removing_a_helper_dissolves_its_pipelines() -> None:
    planner = PipelinePlanner([2, 3], 4, helpers={0: 2}, holdings={2: {0}, 3: {1}})
    (p,) = planner.plan.active
    assert 0 in p.nodes
    out = planner.remove_node(0)
    assert out is not None and out.dissolve == (p,) and out.active == ()
    assert planner.helpers == {}
    with pytest.raises(PlanError, match="not one of the planner's nodes"):
        planner.remove_node(0)


def test_bad_helpers_are_refused() -> None:
    with pytest.raises(PlanError, match="both helpers and receivers"):
        plan_pipelines({2: {0}}, 2, helpers={2: 1})
    with pytest.raises(PlanError, match=">= 0"):
        PipelinePlanner([2], 2, helpers={0: -1})


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 16), s=st.integers(1, 3), b=st.sampled_from([2, 4, 8]), room=st.integers(0, 4))
def test_incremental_equals_pure_with_helpers(n: int, s: int, b: int, room: int) -> None:
    s = min(s, n - 1)
    plan = plan_multicast("binomial", n, s, b, 2 * b)
    helpers = {v: room for v in range(s)}
    planner = PipelinePlanner(plan.receiver_nodes, b, 2 * b, helpers=helpers)
    chunks: dict[int, set[int]] = {v: set() for v in plan.receiver_nodes}
    for rnd in plan.rounds:
        for snd in rnd:  # each arrival: the incremental answer is the pure one on the holdings now
            prev = planner.plan.active
            planner.on_chunk(snd.dst, snd.chunk)
            chunks[snd.dst].add(snd.chunk)
            holdings = {v: set(planner.layout.blocks_held(cs)) for v, cs in chunks.items()}
            pure = plan_pipelines(holdings, b, current=prev, helpers=helpers)
            assert pure.active == planner.plan.active and pure.solo == planner.plan.solo
            _check_assisted(planner.plan, holdings, helpers, b)
    if plan.receiver_nodes:
        assert planner.plan.solo == plan.receiver_nodes and planner.plan.active == ()


def test_an_assisted_pipeline_may_use_fewer_receivers_and_none_forms_once_one_is_full() -> None:
    # the first ticks of the reference two-source plan: one receiver still holds nothing
    h = {2: {0}, 3: set(), 4: {4, 5, 6}, 5: {4, 5}}
    (p,) = plan_pipelines(h, 8, helpers={0: 2, 1: 2}).form
    receivers = [v for v in p.nodes if v not in (0, 1)]
    assert sorted(receivers) == [2, 4, 5]
    assert sorted(b for b, v in enumerate(p.assignment) if v in (0, 1)) == [1, 2, 3, 7]
    # fed back, it fills the planned 4-node slot: no second pipeline from node 3 and helpers
    again = plan_pipelines({**h, 3: {0}}, 8, helpers={0: 4, 1: 4}, current=(p,))
    assert again.keep == (p,) and again.form == ()
    # a full receiver ends the helpers' part: no assisted pipeline forms any more
    late = {2: set(range(8)), 3: {0, 1}, 4: {4, 5}, 5: {6, 7}}
    assert plan_pipelines(late, 8, helpers={0: 4, 1: 4}).active == ()
    assert len(plan_pipelines({**late, 2: {0}}, 8, helpers={0: 4, 1: 4}).form) == 1


def test_one_receiver_forms_a_pipeline_only_with_a_lending_helper() -> None:
    # a 1 -> 2 scale-out: the receiver holds blocks 0-2 of 8; the serving source lends its device
    h = {1: {0, 1, 2}}
    assert plan_pipelines(h, 8).active == ()  # a planned size of 1 is the node serving alone
    plan = plan_pipelines(h, 8, helpers={0: 8})
    (p,) = plan.form
    _check_assisted(plan, h, {0: 8}, 8)
    assert p.assignment == (1, 1, 1, 0, 0, 0, 0, 0)  # the receiver runs what it holds, the helper the rest
    assert plan_pipelines(h, 8, helpers={0: 4}).active == ()  # five blocks missing, four lent
    planner = PipelinePlanner([1], 8, helpers={0: 8})
    assert planner.on_block(1, 0) is not None and planner.plan.active[0].assignment == (1,) + (0,) * 7
    for b in range(1, 7):
        planner.on_block(1, b)
    assert len(planner.plan.active) == 1  # kept while the receiver cannot serve alone
    last = planner.on_block(1, 7)
    assert last is not None and last.dissolve and last.active == () and last.solo == (1,)


def test_the_odd_receiver_out_gets_its_own_assisted_pipeline() -> None:
    # five receivers plan sizes (4, 1): with room, the fifth runs a pipeline with the helpers
    h = {2: {0, 1}, 3: {2, 3}, 4: {4, 5}, 5: {6, 7}, 6: {0, 1, 2}}
    plan = plan_pipelines(h, 8, helpers={0: 8})
    assert sorted(p.size for p in plan.form) == [2, 4]
    (odd,) = [p for p in plan.form if 6 in p.nodes]
    assert odd.assignment == (6, 6, 6, 0, 0, 0, 0, 0)
    _check_assisted(plan, h, {0: 8}, 8)
    assert len(plan_pipelines(h, 8).form) == 1  # receivers only: the fifth waits to serve alone
