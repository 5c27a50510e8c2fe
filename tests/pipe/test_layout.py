"""ChunkLayout: tiling, overlaps, the uniform rule, and planners fed a non-uniform layout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.pipe import ChunkLayout, LayoutError, PipelinePlanner, PlanError, plan_multicast, validate_plan
from lambdascale.pipe.multicast import source_order
from lambdascale.pipe.multicast_plan import chunks_of_block
from lambdascale.pipe.player import Links, play


@given(st.integers(1, 12), st.integers(0, 40))
def test_uniform_equals_the_old_rule(b: int, extra: int) -> None:
    k = b + extra
    lay = ChunkLayout.uniform(b, k)
    for c in range(k):
        assert lay.blocks_of_chunk(c) == range(c * b // k, c * b // k + 1)
    for blk in range(b):
        assert lay.chunks_of_block(blk) == chunks_of_block(blk, b, k)
    assert lay.is_uniform()


@settings(max_examples=200)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=10), st.integers(1, 64))
def test_equal_bytes_tiles_and_overlaps_are_exact(sizes: list[int], k: int) -> None:
    total = sum(sizes)
    k = min(k, total)
    lay = ChunkLayout.equal_bytes(sizes, k)
    lengths = lay.chunk_lengths()
    assert sum(lengths) == total and len(lengths) == k
    assert max(lengths) - min(lengths) <= 1  # equal-byte: lengths differ by at most one byte
    for c in range(k):
        s, e = lay.chunk_range(c)
        assert (s, e) == (c * total // k, (c + 1) * total // k)
        # brute force: the blocks this chunk overlaps
        want = [b for b in range(len(sizes)) if lay.block_range(b)[0] < e and s < lay.block_range(b)[1]]
        assert list(lay.blocks_of_chunk(c)) == want
    for b in range(len(sizes)):
        s, e = lay.block_range(b)
        want = [c for c in range(k) if lay.chunk_range(c)[0] < e and s < lay.chunk_range(c)[1]]
        assert list(lay.chunks_of_block(b)) == want
        assert lay.blocks_held(set(range(k)) - {want[0]}) == {x for x in range(len(sizes)) if want[0] not in lay.chunks_of_block(x)}


def test_one_chunk_may_complete_two_blocks() -> None:
    lay = ChunkLayout.equal_bytes([10, 10, 40], 3)  # chunks [0,20) [20,40) [40,60)
    assert list(lay.chunks_of_block(0)) == [0] and list(lay.chunks_of_block(1)) == [0]
    assert list(lay.blocks_of_chunk(0)) == [0, 1]
    assert list(lay.chunks_of_block(2)) == [1, 2]
    assert lay.blocks_held({0}) == {0, 1}
    assert lay.missing_for_blocks(1, 3, {0, 2}) == [1]


def test_bad_layouts_name_the_field() -> None:
    with pytest.raises(LayoutError, match="chunk_bounds: range 1 is empty"):
        ChunkLayout((0, 5), (0, 2, 2, 5))
    with pytest.raises(LayoutError, match="blocks end at 5 but chunks end at 6"):
        ChunkLayout((0, 5), (0, 6))
    with pytest.raises(LayoutError, match="block_bounds: must start at 0"):
        ChunkLayout((1, 5), (0, 5))
    with pytest.raises(LayoutError, match="block_nbytes: block 1 has 0 bytes"):
        ChunkLayout.equal_bytes([3, 0], 2)
    with pytest.raises(LayoutError, match=r"n_chunks must be in \[1, total bytes=3\]"):
        ChunkLayout.equal_bytes([1, 2], 4)
    with pytest.raises(LayoutError, match="n_chunks must be >= n_blocks=4"):
        ChunkLayout.uniform(4, 3)
    with pytest.raises(PlanError, match="layout: layout has 2 blocks and 4 chunks, the plan 3"):
        plan_multicast("binomial", 4, 1, 3, 4, layout=ChunkLayout.uniform(2, 4))


# a qwen2-0.5b-like model: fat first and last blocks (embedding / LM head), thin middle ones
QWEN_LIKE = [172, 43, 43, 43, 43, 43, 43, 172]


def test_pipeline_planner_completes_blocks_by_overlapping_chunks() -> None:
    lay = ChunkLayout.equal_bytes(QWEN_LIKE, 16)
    planner = PipelinePlanner([1, 2], 8, layout=lay)
    assert planner.n_chunks == 16
    # the middle blocks share chunks: find one chunk overlapping two blocks
    spanning = next(c for c in range(16) if len(lay.blocks_of_chunk(c)) == 2)
    need = set()
    for b in lay.blocks_of_chunk(spanning):
        need |= set(lay.chunks_of_block(b))
    for c in sorted(need - {spanning}):
        planner.on_chunk(1, c)
    assert planner.holdings()[1] == lay.blocks_held(need - {spanning})
    planner.on_chunk(1, spanning)
    assert set(lay.blocks_of_chunk(spanning)) <= planner.holdings()[1]
    # every chunk to both nodes: both end solo
    for v in (1, 2):
        for c in range(16):
            planner.on_chunk(v, c)
    assert planner.solo == (1, 2)


@pytest.mark.parametrize("sources", [1, 2, 3])
def test_multicast_with_a_byte_layout_is_valid_and_orders_by_bytes(sources: int) -> None:
    lay = ChunkLayout.equal_bytes(QWEN_LIKE, 16)
    plan = plan_multicast("binomial", 6, sources, 8, 16, layout=lay)
    validate_plan(plan)
    for g in range(min(sources, 6 - sources)):
        order = source_order(g, min(sources, 6 - sources), 8, 16, lay)
        assert sorted(order) == list(range(16))  # each chunk exactly once
    # block views follow the layout: a block is whole when its last overlapping chunk arrived
    for n in plan.receiver_nodes:
        for b in range(8):
            assert plan.node_block_ticks[n][b] == max(plan.arrival_round(n, c) for c in lay.chunks_of_block(b))


def test_equal_byte_chunks_bring_the_replay_to_the_bound() -> None:
    """The acceptance finding, in the player: same blocks, uniform vs equal-byte chunks."""
    total = sum(QWEN_LIKE)
    links = Links(nic_send_bps=1.0, nic_recv_bps=1.0, latency_s=0.0)
    bound = (16 - 1 + 3) / 16 * total  # k - 1 + ceil(log2 6) rounds of T/k bytes
    uni = ChunkLayout((0, *[sum(QWEN_LIKE[: i + 1]) for i in range(8)]),
                      tuple(sorted({x for i in range(8) for x in (sum(QWEN_LIKE[:i]), sum(QWEN_LIKE[:i]) + QWEN_LIKE[i] // 2)} | {total})))
    assert uni.is_uniform()  # two chunks per block: today's format
    res = {}
    for name, lay in (("uniform", uni), ("bytes", ChunkLayout.equal_bytes(QWEN_LIKE, 16))):
        plan = plan_multicast("binomial", 6, 1, 8, 16, layout=lay)
        res[name] = play(plan, [float(x) for x in lay.chunk_lengths()], links, mode="chunk").completion_time / bound
    assert res["bytes"] <= 1.05 < 1.3 < res["uniform"]


@settings(max_examples=30, deadline=None)
@given(st.permutations([(n, c) for n in (1, 2, 3, 4, 5) for c in range(16)]))
def test_incremental_planner_equals_pure_planner_fed_chunks(arrivals) -> None:
    """Chunk by chunk under a byte layout, the incremental planner's pipelines equal
    plan_pipelines(chunk holdings, layout=...) with the previous answer as ``current``."""
    from lambdascale.pipe import plan_pipelines

    lay = ChunkLayout.equal_bytes(QWEN_LIKE, 16)
    nodes = [1, 2, 3, 4, 5]
    planner = PipelinePlanner(nodes, 8, layout=lay)
    held: dict[int, set[int]] = {n: set() for n in nodes}
    for n, c in arrivals[:48]:
        before = planner.plan.active
        planner.on_chunk(n, c)
        held[n].add(c)
        if planner.holdings() != {v: lay.blocks_held(h) for v, h in held.items()}:
            raise AssertionError("planner's block holdings differ from the layout's")
        pure = plan_pipelines(held, 8, current=before, layout=lay)
        assert planner.plan.active == pure.active and planner.plan.solo == pure.solo
    with pytest.raises(PlanError, match="holdings of node 1: chunk 16 outside 0..15"):
        plan_pipelines({1: {16}}, 8, layout=lay)


def test_two_sources_deal_contiguous_halves_of_a_byte_layout() -> None:
    """With equal-byte chunks, each source sends one contiguous half first, so receivers of the two
    groups together hold every block (and form a pipeline) after about half the chunks; dealing
    interleaved blocks needs the chunks across every set boundary twice."""
    from lambdascale.pipe.multicast import deal_blocks

    lay = ChunkLayout.equal_bytes(QWEN_LIKE, 16)
    assert deal_blocks(2, 8, 16, lay) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    sets = deal_blocks(3, 8, 16, lay)
    assert [b for s in sets for b in s] == list(range(8)) and all(sets)  # contiguous, every group has blocks
    plan = plan_multicast("binomial", 6, 2, 8, 16, layout=lay)
    res = play(plan, [float(x) for x in lay.chunk_lengths()], Links(nic_send_bps=1.0, nic_recv_bps=1.0, latency_s=0.0),
               mode="chunk")
    chunk = sum(QWEN_LIKE) / 16
    assert res.first_pipeline_time <= 9.01 * chunk  # 8 chunks + the one across the halves
    assert max(res.node_full.values()) <= 17.01 * chunk  # and completion is not worse for it
