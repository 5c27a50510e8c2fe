"""Micro-batches in flight on a pipeline (``PipelineServer`` with ``pipe.slots`` > 1), no agents.

A stand-in pipeline checks what the server must guarantee to the stages: steps in flight at once
use distinct hidden-state slots and disjoint sequences, a sequence's KV is released only when no
step of it runs, and the streams equal a one-step-at-a-time run's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import TokenState
from lambdascale.runtime.pipeline import PipelineServer, microbatch_slots
from tests.runtime.conftest import run_async


def _token(seed: int, index: int) -> int:
    """A pure 'sampler': the token depends on the request's seed and the token index only."""
    return 3 + (seed * 31 + index * 7) % 50


@dataclass
class _SlotPipe:
    """Stands in for a RemotePipeline with ``slots`` hidden-state slots; checks the server's contract."""

    slots: int
    max_step_tokens: int = 64
    max_seqs: int = 16
    max_len: int = 512
    batch_invariant: bool = False
    name: str = "slots"
    hold: asyncio.Event | None = None  # when set up, steps wait for it
    live: dict[int, list[str]] = field(default_factory=dict)
    peak: int = 0
    steps: list[list[tuple[str, int, int]]] = field(default_factory=list)
    releases: list[tuple[list[str], set[str]]] = field(default_factory=list)  # (released, live then)
    all_live: asyncio.Event = field(default_factory=asyncio.Event)

    async def step(self, seqs, token_ids, sample, release=(), slot=0):
        assert 0 <= slot < self.slots and slot not in self.live, f"slot {slot} reused while in flight"
        ids = [sid for sid, _, _ in seqs]
        for other in self.live.values():
            assert not set(other) & set(ids), "a sequence is in two steps at once"
        assert len(token_ids) == sum(n for _, _, n in seqs) <= self.max_step_tokens
        self.releases.append((list(release), {s for o in self.live.values() for s in o}))
        self.live[slot] = ids
        self.peak = max(self.peak, len(self.live))
        self.steps.append(list(seqs))
        if len(self.live) == self.slots:
            self.all_live.set()
        if self.hold is not None:
            await self.hold.wait()
        else:
            await asyncio.sleep(0)  # a yield, so the other steps started with this one run too
        del self.live[slot]
        return [_token(seed, idx) for _, seed, idx in sample]


def _reqs(n: int, max_tokens: int = 5) -> dict[str, TokenState]:
    return {
        f"r{i}": TokenState(tuple(range(3, 8 + i % 4)), (), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 100 + i)
        for i in range(n)
    }


def _drive(slots: int, reqs: dict[str, TokenState]) -> tuple[dict[str, list[int]], _SlotPipe, PipelineServer]:
    pipe = _SlotPipe(slots)
    streamed: dict[str, list[int]] = {r: [] for r in reqs}
    srv = PipelineServer(pipe, on_token=lambda r, t: streamed[r].append(t))  # type: ignore[arg-type]
    for rid, st in reqs.items():
        srv.add(rid, st)
    run_async(srv.run())
    return streamed, pipe, srv


def test_slots_default_to_one_per_stage() -> None:
    assert microbatch_slots(4, 0) == 4
    assert microbatch_slots(1, 0) == 1
    assert microbatch_slots(4, 2) == 2
    assert microbatch_slots(100, 0) == 64  # FormStage.slots' limit
    with pytest.raises(ValueError, match="microbatches must be >= 0"):
        microbatch_slots(4, -1)


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_steps_overlap_on_disjoint_requests_and_streams_do_not_change(slots: int) -> None:
    reqs = _reqs(9)
    one, pipe1, _ = _drive(1, reqs)
    many, pipe, srv = _drive(slots, reqs)
    assert one == many == {rid: [_token(st.seed, i) for i in range(5)] for rid, st in reqs.items()}
    assert pipe1.peak == 1
    assert pipe.peak == slots and srv.max_in_flight == slots  # the stand-in asserted slots and disjointness
    cap = -(-len(reqs) // slots)
    assert max(len(s) for s in pipe.steps) <= cap  # micro-batches stay even: at most ceil(requests / slots)
    assert not srv.busy and srv.finished.keys() == reqs.keys()
    for released, live in pipe.releases:  # no KV is freed under a step still computing it
        assert not set(released) & live


def test_take_needs_drain_and_a_dropped_request_is_freed_after_its_step() -> None:
    async def main() -> None:
        pipe = _SlotPipe(2, hold=asyncio.Event())
        streamed: dict[str, list[int]] = {}
        srv = PipelineServer(pipe, on_token=lambda r, t: streamed.setdefault(r, []).append(t))  # type: ignore[arg-type]
        for rid, st in _reqs(4).items():
            srv.add(rid, st)
        first = asyncio.ensure_future(srv.step())
        await pipe.all_live.wait()  # two steps of two requests each are running
        assert len(srv.in_flight) == 4
        with pytest.raises(RuntimeError, match="in flight: drain"):
            srv.take()
        victim = pipe.live[0][0]
        assert srv.drop(victim) and not srv.drop(victim)
        pipe.hold.set()
        await first
        await srv.drain()
        assert victim not in streamed  # its step finished after the drop: nothing streamed
        assert victim not in srv.finished
        moved = srv.take()
        assert victim not in moved and len(moved) == 3
        # the next step frees the victim's KV (it is no longer in flight)
        srv.add("late", _reqs(1)["r0"])
        await srv.run(max_steps=1)
        assert any(victim in rel for rel, _ in pipe.releases)

    run_async(main())


def test_a_failed_step_drains_the_others_and_raises() -> None:
    class _Boom(RuntimeError):
        pass

    @dataclass
    class _FailingPipe(_SlotPipe):
        async def step(self, seqs, token_ids, sample, release=(), slot=0):
            if slot == 1:
                await asyncio.sleep(0)
                raise _Boom("stage died")
            return await super().step(seqs, token_ids, sample, release, slot)

    async def main() -> None:
        pipe = _FailingPipe(2)
        streamed: dict[str, list[int]] = {}
        srv = PipelineServer(pipe, on_token=lambda r, t: streamed.setdefault(r, []).append(t))  # type: ignore[arg-type]
        for rid, st in _reqs(4).items():
            srv.add(rid, st)
        with pytest.raises(_Boom):
            await srv.run()
        assert not srv.in_flight  # drained: token states are exact, take works
        moved = srv.take()
        assert len(moved) == 4
        for rid, st in moved.items():  # what the good step computed is kept, the failed one's is not
            assert list(st.output_ids) == streamed.get(rid, [])

    run_async(main())
