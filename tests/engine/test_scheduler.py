"""The scheduler as a pure function, with no model."""

from __future__ import annotations

import pytest

from lambdascale.engine.scheduler import ScheduledSeq, SeqView, schedule


def test_decodes_first_then_waiting_fifo() -> None:
    running = [SeqView("a", 10, 11), SeqView("b", 4, 5)]
    waiting = [SeqView("c", 0, 6), SeqView("d", 0, 3)]
    out = schedule(running, waiting, max_batch_size=8, max_num_batched_tokens=100)
    assert out.seqs == (
        ScheduledSeq("a", 10, 1, True),
        ScheduledSeq("b", 4, 1, True),
        ScheduledSeq("c", 0, 6, True),
        ScheduledSeq("d", 0, 3, True),
    )
    assert out.admitted == ("c", "d") and out.num_tokens == 11


def test_batch_size_limits_admission() -> None:
    running = [SeqView("a", 3, 4)]
    waiting = [SeqView("b", 0, 2), SeqView("c", 0, 2)]
    out = schedule(running, waiting, max_batch_size=2, max_num_batched_tokens=100)
    assert out.admitted == ("b",)
    assert [s.request_id for s in out.seqs] == ["a", "b"]


def test_token_budget_chunks_long_prompts_and_samples_only_at_the_end() -> None:
    out = schedule([SeqView("a", 7, 8)], [SeqView("b", 0, 10)], max_batch_size=4, max_num_batched_tokens=5)
    assert out.seqs == (ScheduledSeq("a", 7, 1, True), ScheduledSeq("b", 0, 4, False))
    # next step: b is running with 6 tokens left; the budget gives it 5 of them, still no sample
    out2 = schedule([SeqView("a", 8, 9), SeqView("b", 4, 10)], [], max_batch_size=4, max_num_batched_tokens=6)
    assert out2.seqs == (ScheduledSeq("a", 8, 1, True), ScheduledSeq("b", 4, 5, False))
    out3 = schedule([SeqView("b", 9, 10)], [], max_batch_size=4, max_num_batched_tokens=6)
    assert out3.seqs == (ScheduledSeq("b", 9, 1, True),)


def test_no_budget_left_means_no_admission() -> None:
    running = [SeqView(f"r{i}", 5, 6) for i in range(3)]
    out = schedule(running, [SeqView("w", 0, 4)], max_batch_size=10, max_num_batched_tokens=3)
    assert out.admitted == () and len(out.seqs) == 3


def test_empty_and_bad_limits() -> None:
    assert schedule([], [], 1, 1).is_empty
    with pytest.raises(ValueError, match="max_batch_size=0"):
        schedule([], [], 0, 1)
