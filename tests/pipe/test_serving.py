"""The serving rules the runtime's and the simulator's pipelines share."""

from __future__ import annotations

import pytest

from lambdascale.pipe.serving import MAX_SLOTS, microbatch_slots, pipeline_seqs


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
