"""The serving rules the runtime's and the simulator's pipelines share."""

from __future__ import annotations

import pytest

from lambdascale.pipe.serving import (
    MAX_SLOTS,
    KvTarget,
    kv_destination,
    lending_helpers,
    microbatch_slots,
    pipeline_seqs,
    pipeline_seqs_for,
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
