"""Multicast schedules: hand-checked small cases, the reference ticks, and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.pipe import (
    Algo,
    PlanError,
    PlanViolation,
    Send,
    SendKind,
    chunks_of_block,
    lower_bound_rounds,
    plan_multicast,
    source_order,
    validate_plan,
)
from lambdascale.pipe.multicast_plan import MulticastPlan

N = SendKind.NETWORK
I = SendKind.INTRA


def test_chunk_to_block_mapping_matches_contract() -> None:
    # chunk c belongs to block c*B//K; chunks_of_block inverts it, also for uneven splits
    for B, K in ((8, 16), (3, 7), (5, 5), (1, 4)):
        for b in range(B):
            assert all(c * B // K == b for c in chunks_of_block(b, B, K))
        assert sum(len(chunks_of_block(b, B, K)) for b in range(B)) == K


def test_binomial_four_nodes_two_chunks_by_hand() -> None:
    # l = 2. Round 1 (dim 1): 0 sends chunk 0 to 1. Round 2 (dim 2): 0 sends chunk 1 to 2, 1 sends
    # chunk 0 to 3. Round 3 (dim 1): 0 sends its highest chunk 1 to 1 (1 lacks it), 2 sends chunk 1
    # to 3 and 3 sends chunk 0 to 2. Bound: k - 1 + log2 n = 1 + 2 = 3 rounds.
    p = plan_multicast("binomial", 4, 1, 1, 2)
    assert p.rounds == (
        (Send(0, 1, 0, N),),
        (Send(0, 2, 1, N), Send(1, 3, 0, N)),
        (Send(0, 1, 1, N), Send(2, 3, 1, N), Send(3, 2, 0, N)),
    )
    assert p.completion_round == lower_bound_rounds(4, 2) == 3
    assert p.arrival_order(2) == (1, 0)
    assert p.arrival_round(3, 1) == 3 and p.arrival_round(0, 1) == 0


def test_binomial_three_nodes_mate_mirrors_hypercube_node() -> None:
    # n = 3: hypercube {0, 1}, node 2 teams with node 1. The source needs nothing back, so node 1
    # keeps receiving from the source and forwards each chunk to its mate one round later.
    p = plan_multicast("binomial", 3, 1, 3, 3)
    assert p.rounds == (
        (Send(0, 1, 0, N),),
        (Send(0, 1, 1, N), Send(1, 2, 0, N)),
        (Send(0, 1, 2, N), Send(1, 2, 1, N)),
        (Send(1, 2, 2, N),),
    )
    assert p.completion_round == lower_bound_rounds(3, 3) == 4


@pytest.mark.parametrize("sources,all_blocks", [(1, 18), (2, 9), (3, 6), (4, 4)])
def test_reference_schedule_ticks_until_every_block_is_whole(sources: int, all_blocks: int) -> None:
    # DESIGN.md: 8 nodes, 16 chunks, 8 blocks; ticks until every whole block exists on some
    # receiver. Tick t is the end of round t (1-based), the convention of the reference.
    p = plan_multicast("binomial", 8, sources, 8, 16)
    validate_plan(p)
    assert p.all_blocks_round == all_blocks


def test_reference_three_sources_by_hand() -> None:
    # 3 sources, 5 receivers: groups {3,4}, {5,6}, {7}. Blocks dealt: {0,3,6}, {1,4,7}, {2,5}.
    assert source_order(0, 3, 8, 16)[:6] == [0, 1, 6, 7, 12, 13]
    assert source_order(2, 3, 8, 16)[:4] == [4, 5, 10, 11]
    p = plan_multicast("binomial", 8, 3, 8, 16)
    # node 3 receives chunks 0,1,6,7,12,13 (blocks 0, 3, 6) in rounds 1..6 straight from source 0
    assert [p.arrival_round(3, c) for c in (0, 1, 6, 7, 12, 13)] == [1, 2, 3, 4, 5, 6]
    assert p.node_block_ticks[3][6] == 6
    assert p.node_block_ticks[7][5] == 4  # lone receiver 7 gets blocks 2 and 5 by tick 4


def test_ring_and_direct_by_hand() -> None:
    p = plan_multicast("ring", 3, 1, 1, 2)
    assert p.rounds == ((Send(0, 1, 0, N),), (Send(0, 1, 1, N), Send(1, 2, 0, N)), (Send(1, 2, 1, N),))
    d = plan_multicast("direct", 3, 1, 1, 2)
    assert d.rounds == ((Send(0, 1, 0, N),), (Send(0, 2, 0, N),), (Send(0, 1, 1, N),), (Send(0, 2, 1, N),))


def test_faasnet_binary_tree_by_hand() -> None:
    # 4 nodes as a heap: 0 -> {1, 2}, 1 -> {3}; the root alternates between its children.
    p = plan_multicast("faasnet", 4, 1, 1, 2)
    validate_plan(p)
    assert p.rounds[0] == (Send(0, 1, 0, N),)
    assert p.rounds[1] == (Send(0, 2, 0, N), Send(1, 3, 0, N))
    assert p.completion_round == 4


def test_topology_fans_out_inside_the_node() -> None:
    # 2 nodes x 3 GPUs: chunk c crosses the network once (GPU 0 -> GPU 3) and is fanned out to
    # GPUs 4 and 5 in the next round over two distinct intra-node links.
    p = plan_multicast("binomial", 2, 1, 1, 2, gpus_per_node=3)
    assert [set(r) for r in p.rounds] == [
        {Send(0, 3, 0, N)},
        {Send(0, 3, 1, N), Send(3, 4, 0, I), Send(3, 5, 0, I)},
        {Send(3, 4, 1, I), Send(3, 5, 1, I)},
    ]
    assert p.receivers == (3, 4, 5)
    assert sum(1 for r in p.rounds for s in r if s.kind is N) == 2  # once per node per chunk
    validate_plan(p)


def test_one_nic_per_gpu_stripes_chunks_over_lanes() -> None:
    # 2 nodes x 2 GPUs, a NIC on each GPU: lane 0 carries chunks 0, 2 between GPUs 0 and 2,
    # lane 1 chunks 1, 3 between GPUs 1 and 3; each receiving GPU fans out to its neighbour.
    p = plan_multicast("binomial", 2, 1, 2, 4, gpus_per_node=2, nics_per_node=2)
    assert [set(r) for r in p.rounds] == [
        {Send(0, 2, 0, N), Send(1, 3, 1, N)},
        {Send(0, 2, 2, N), Send(1, 3, 3, N), Send(2, 3, 0, I), Send(3, 2, 1, I)},
        {Send(2, 3, 2, I), Send(3, 2, 3, I)},
    ]
    validate_plan(p)
    one = plan_multicast("binomial", 2, 1, 2, 4, gpus_per_node=2)
    assert one.completion_round == 5 and p.completion_round == 3
    with pytest.raises(PlanError, match="nics_per_node"):
        plan_multicast("binomial", 2, 1, 2, 4, gpus_per_node=2, nics_per_node=3)


def test_validator_catches_each_rule() -> None:
    good = plan_multicast("binomial", 4, 1, 1, 2)

    def with_rounds(rounds) -> MulticastPlan:
        return MulticastPlan(good.algo, 4, 1, (0,), 1, 2, rounds, (1, 2, 3))

    with pytest.raises(PlanViolation, match="does not hold"):
        validate_plan(with_rounds(((Send(1, 2, 0),),) + good.rounds))
    with pytest.raises(PlanViolation, match="sends twice"):
        validate_plan(with_rounds(((Send(0, 1, 0), Send(0, 2, 1)),) + good.rounds))
    with pytest.raises(PlanViolation, match="receives twice"):
        validate_plan(with_rounds(((Send(0, 1, 0),), (Send(0, 2, 1), Send(1, 2, 0))) + good.rounds))
    with pytest.raises(PlanViolation, match="ends without"):
        validate_plan(with_rounds(good.rounds[:-1]))
    topo = plan_multicast("binomial", 2, 1, 1, 1, gpus_per_node=2)
    bad = MulticastPlan(topo.algo, 2, 2, (0,), 1, 1, ((Send(1, 3, 0, N),), (Send(3, 2, 0, I),)), (1,))
    with pytest.raises(PlanViolation, match="endpoint 1 has no NIC"):
        validate_plan(bad)


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(PlanError, match="n_nodes"):
        plan_multicast("binomial", 0, 1, 8, 16)
    with pytest.raises(PlanError, match="n_chunks"):
        plan_multicast("binomial", 4, 1, 8, 4)
    with pytest.raises(PlanError, match=r"outside 0\.\.3"):
        plan_multicast("binomial", 4, [7], 1, 1)
    with pytest.raises(PlanError, match="unknown algo"):
        plan_multicast("gossip", 4, 1, 1, 1)
    with pytest.raises(PlanError, match="sources"):
        plan_multicast("ring", 4, 5, 1, 1)


def test_no_receivers_and_more_sources_than_receivers() -> None:
    p = plan_multicast("binomial", 3, 3, 2, 2)
    assert p.rounds == () and p.receivers == () and p.all_blocks_round == 0
    q = plan_multicast("binomial", 5, [0, 2, 4], 2, 4)  # 3 sources, 2 receivers: 2 sources send
    validate_plan(q)
    assert set(q.source_orders) == {0, 2} and q.receiver_nodes == (1, 3)


# ---- properties --------------------------------------------------------------------------------

@st.composite
def shapes(draw, max_nodes: int = 40):
    n = draw(st.integers(1, max_nodes))
    s = draw(st.integers(1, n))
    b = draw(st.integers(1, 8))
    k = draw(st.integers(b, 24))
    g = draw(st.sampled_from([1, 1, 1, 2, 4]))
    nics = draw(st.integers(1, g))
    return n, s, b, k, g, nics


@settings(max_examples=120, deadline=None)
@given(algo=st.sampled_from(list(Algo)), shape=shapes())
def test_every_plan_obeys_the_rules(algo: Algo, shape) -> None:
    n, s, b, k, g, nics = shape
    p = plan_multicast(algo, n, s, b, k, gpus_per_node=g, nics_per_node=nics)
    validate_plan(p)  # holds-before-send, per-NIC/per-link rule, every receiver complete
    assert len(p.receivers) == (n - s) * g
    for e in p.receivers:
        assert sorted(p.arrival_order(e)) == list(range(k))
    if g > 1:  # a chunk crosses the network once per receiving node
        net = sum(1 for r in p.rounds for x in r if x.kind is SendKind.NETWORK)
        assert net == (n - s) * k


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 70), k=st.integers(1, 40))
def test_binomial_meets_the_bound(n: int, k: int) -> None:
    p = plan_multicast("binomial", n, 1, 1, k)
    bound = lower_bound_rounds(n, k)
    if n & (n - 1) == 0:
        assert p.completion_round == bound
    else:
        assert bound <= p.completion_round <= bound + 1


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 20), s=st.integers(1, 6), b=st.integers(1, 8), extra=st.integers(0, 16))
def test_more_sources_make_whole_blocks_no_later(r: int, s: int, b: int, extra: int) -> None:
    # same receivers, one more source: every block is whole among the receivers no later
    k = b + extra
    few = plan_multicast("binomial", r + s, s, b, k)
    more = plan_multicast("binomial", r + s + 1, s + 1, b, k)
    assert more.all_blocks_round <= few.all_blocks_round


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 40), s=st.integers(1, 5), b=st.integers(1, 8), extra=st.integers(0, 20))
def test_multi_source_groups_each_stay_within_one_round_of_their_bound(r: int, s: int, b: int, extra: int) -> None:
    # receivers are split into min(S, R) groups of ceil(R / S) or fewer; each group is a binomial
    # pipeline of its source plus its receivers, so the plan ends within one round of that bound
    k = b + extra
    p = plan_multicast("binomial", r + s, s, b, k)
    groups = min(s, r)
    largest = -(-r // groups) + 1  # receivers of the largest group plus its source
    assert p.completion_round <= lower_bound_rounds(largest, k) + 1
    # block reordering: each sending source's order is a permutation of all chunks
    for order in p.source_orders.values():
        assert sorted(order) == list(range(k))


def test_uneven_blocks_are_dealt_by_chunk_count() -> None:
    from lambdascale.pipe.multicast import deal_blocks

    # 6 blocks over 9 chunks: blocks 0, 2, 4 hold 2 chunks, blocks 1, 3, 5 one chunk
    assert [len(chunks_of_block(b, 6, 9)) for b in range(6)] == [2, 1, 2, 1, 2, 1]
    assert deal_blocks(4, 6, 9) == [[0, 5], [2], [4], [1, 3]]  # largest first: 3, 2, 2, 2 chunks
    assert deal_blocks(2, 8, 16) == [[0, 2, 4, 6], [1, 3, 5, 7]]  # equal blocks: round-robin


def test_arrival_queries_name_a_bad_endpoint_or_chunk() -> None:
    p = plan_multicast("binomial", 4, 1, 1, 2)
    with pytest.raises(PlanError, match="endpoint 9"):
        p.arrival_round(9, 0)
    with pytest.raises(PlanError, match="chunk 5"):
        p.arrival_round(1, 5)
