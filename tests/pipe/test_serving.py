"""The serving rules the runtime's and the simulator's pipelines share."""

from __future__ import annotations

import pytest

from lambdascale.pipe.serving import (
    MAX_SLOTS,
    KvPolicy,
    KvTarget,
    kept_slots,
    kv_destination,
    lending_helpers,
    microbatch_cap,
    microbatch_slots,
    pipeline_planner,
    pipeline_seqs,
    pipeline_seqs_for,
    pipeline_step_tokens,
)


def test_one_step_in_flight_per_stage_unless_told() -> None:
    assert [microbatch_slots(k, 0) for k in (1, 2, 5)] == [1, 2, 5]
    assert microbatch_slots(5, 2) == 2 and microbatch_slots(1, 3) == 3
    assert microbatch_slots(1000, 0) == MAX_SLOTS
    with pytest.raises(ValueError, match="microbatches must be >= 0"):
        microbatch_slots(3, -1)


def test_a_pipeline_takes_the_sequences_its_widest_stage_has_kv_memory_for() -> None:
    assert pipeline_seqs(8, 32, 16, 2) == 16        # two equal stages: twice a full instance
    assert pipeline_seqs(8, 32, 11, 3) == 23        # floor(8 x 32 / 11)
    assert pipeline_seqs(8, 32, 32, 1) == 8         # one stage is a full instance
    assert pipeline_seqs(8, 32, 8, 4, "instance") == 8
    assert pipeline_seqs(8, 32, 30, 2) == 8         # never fewer than a full instance
    with pytest.raises(ValueError, match="'kv' or 'instance'"):
        pipeline_seqs(8, 32, 16, 2, "memory")
    with pytest.raises(ValueError, match="widest stage must run 1..32 layers"):
        pipeline_seqs(8, 32, 0, 2)


def test_the_widest_of_the_stages_layer_ranges_decides_a_pipelines_sequences() -> None:
    assert pipeline_seqs_for(8, [(0, 16), (16, 32)], 32) == 16
    assert pipeline_seqs_for(8, [(0, 11), (11, 22), (22, 32)], 32) == pipeline_seqs(8, 32, 11, 3) == 23
    assert pipeline_seqs_for(8, [(0, 8)], 8) == 8
    assert pipeline_seqs_for(8, [(0, 4), (4, 8)], 8, "instance") == 8
    with pytest.raises(ValueError, match="at least one stage"):
        pipeline_seqs_for(8, [], 8)


def test_only_sources_serving_the_model_lend_blocks_and_only_when_asked() -> None:
    assert lending_helpers([3, 1, 2], {1, 3}, 2) == {3: 2, 1: 2}
    assert list(lending_helpers([3, 1, 2], {1, 2, 3}, 1)) == [3, 1, 2]  # the sources' order
    assert lending_helpers([3, 1], {1, 3}, 0) == {}
    with pytest.raises(ValueError, match="helper blocks must be >= 0"):
        lending_helpers([1], {1}, -1)


def test_shipped_kv_goes_to_a_receivers_instance_first_then_the_least_busy() -> None:
    a = KvTarget("a", node=0, outstanding=1, free_slots=3, kv_free=100)
    b = KvTarget("b", node=1, outstanding=3, free_slots=1, kv_free=100)
    c = KvTarget("c", node=2, outstanding=0, free_slots=4, kv_free=10)
    assert kv_destination([a, b, c], 5, receivers={1}) is b      # on a receiver's node, though busier
    assert kv_destination([a, b, c], 5, receivers=set()) is c    # least outstanding
    assert kv_destination([a, b, c], 50, receivers=set()) is a   # c's KV memory is too small
    full = KvTarget("d", node=1, outstanding=4, free_slots=0, kv_free=100)
    assert kv_destination([full], 5, receivers={1}) is None       # no free slot: recompute
    tie = KvTarget("0a", node=5, outstanding=1, free_slots=3, kv_free=100)
    assert kv_destination([a, tie], 5, receivers=set()) is tie    # then the lowest id


def _split(n: int, slots: int) -> list[int]:
    """Micro-batch sizes of ``n`` requests launched into ``slots`` free slots one after another."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(microbatch_cap(n - sum(sizes), slots - len(sizes)))
    return sizes


def test_each_microbatch_takes_the_ceiling_of_the_requests_left_over_the_parts_left() -> None:
    assert microbatch_cap(5, 2) == 3 and microbatch_cap(2, 1) == 2 and microbatch_cap(0, 4) == 0
    assert _split(5, 2) == [3, 2]              # the first takes the extra request (not 2 + 3)
    assert _split(10, 4) == [3, 3, 2, 2]
    assert _split(3, 4) == [1, 1, 1]           # never an empty micro-batch
    assert _split(7, 1) == [7]                 # a full instance: one step
    with pytest.raises(ValueError, match="parts >= 1"):
        microbatch_cap(3, 0)
    with pytest.raises(ValueError, match="waiting >= 0"):
        microbatch_cap(-1, 2)


def test_a_pipelines_step_budget_grows_by_its_extra_sequences() -> None:
    assert pipeline_step_tokens(512, 8, 8) == 512          # a full instance keeps its budget
    assert pipeline_step_tokens(512, 8, 16) == 520         # 8 more sequences: 8 more decode tokens
    assert pipeline_step_tokens(8192, 8, pipeline_seqs_for(8, [(0, 11), (11, 22), (22, 32)], 32)) == 8192 + 15
    with pytest.raises(ValueError, match="max_seqs <= seqs"):
        pipeline_step_tokens(512, 8, 4)


def test_a_planner_only_where_a_pipeline_can_form() -> None:
    assert pipeline_planner(True, [2, 3], 8, 16, {}) is not None
    assert pipeline_planner(True, [2], 8, 16, {}) is None            # one receiver alone only serves alone
    assisted = pipeline_planner(True, [2], 8, 16, {0: 2})             # ... unless a source lends it stages
    assert assisted is not None and assisted.helpers == {0: 2}
    assert pipeline_planner(False, [2, 3, 4], 8, 16, {0: 2}) is None  # execute-while-load off


def test_receivers_full_instances_keep_their_share_of_a_pipelines_requests() -> None:
    full_on = {1: "f1", 3: "f3", 0: "f0"}
    # 3 requests over receivers 1, 2, 3 (node 2 has no full instance yet): ceil(3 / 3) = 1 each
    assert kept_slots([(3, (1, 2, 3))], full_on, KvPolicy.AUTO) == {"f1": 1, "f3": 1}
    # 5 over two receivers: 3 each (rounded up); a second pipeline over node 1 adds its share
    assert kept_slots([(5, (1, 3)), (2, (1,))], full_on, "ship") == {"f1": 5, "f3": 3}
    assert kept_slots([(4, (1, 3))], full_on, KvPolicy.RECOMPUTE) == {}   # moved requests re-queue
    assert kept_slots([(0, (1, 3)), (4, ())], full_on, KvPolicy.AUTO) == {}
    with pytest.raises(ValueError, match=">= 0 requests"):
        kept_slots([(-1, (1,))], full_on, KvPolicy.AUTO)
