"""The asyncio wrapper: concurrent streams, bad input, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from lambdascale.engine.async_engine import AsyncEngine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.errors import InvalidRequestError


async def _collect(agen) -> list:
    return [o async for o in agen]


def test_concurrent_async_streams_match_sync(make_engine) -> None:
    prompts = [[1, 2, 3], [7, 8], [100, 90, 80, 70]]
    sp = SamplingParams(max_tokens=9, temperature=0.7, seed=4, ignore_eos=True)
    want = [[t for o in make_engine().generate(p, sp) for t in o.token_ids] for p in prompts]

    async def main() -> list[list[int]]:
        async with AsyncEngine(make_engine()) as eng:
            res = await asyncio.gather(*[_collect(eng.generate(p, sp)) for p in prompts])
            assert eng.engine.runner.cached_sequences() == 0
        return [[t for o in outs for t in o.token_ids] for outs in res]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == want


def test_bad_request_raises_in_the_caller(make_engine) -> None:
    async def main() -> None:
        async with AsyncEngine(make_engine(max_model_len=16)) as eng:
            with pytest.raises(InvalidRequestError, match="context limit of 16"):
                await _collect(eng.generate(list(range(1, 30)), SamplingParams()))
            # the loop survives and serves the next request
            outs = await _collect(eng.generate([1, 2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
            assert outs[-1].finished

    asyncio.run(asyncio.wait_for(main(), 60))


def test_closing_a_stream_aborts_and_frees(make_engine) -> None:
    async def main() -> None:
        async with AsyncEngine(make_engine()) as eng:
            agen = eng.generate([1, 2, 3], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            first = await agen.__anext__()
            assert not first.finished
            await agen.aclose()
            # the abort is a queued command; a round trip through the worker orders after it
            n = await eng._call(lambda e: e.runner.cached_sequences())
            assert n == 0 and not eng.engine.has_unfinished

    asyncio.run(asyncio.wait_for(main(), 60))


def test_abort_ends_the_stream_with_an_abort_delta(make_engine) -> None:
    async def main() -> None:
        async with AsyncEngine(make_engine()) as eng:
            agen = eng.generate([1, 2, 3], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True),
                                request_id="r1")
            await agen.__anext__()
            await eng.abort("r1")
            rest = await _collect(agen)
            assert rest[-1].finished and rest[-1].finish_reason.value == "abort"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_worker_thread_uses_the_engine_thread_setting(make_engine) -> None:
    """``engine.threads`` holds wherever steps run, whatever the process-wide setting was."""
    import torch

    torch.set_num_threads(2)  # the autouse fixture restores the previous value

    async def main() -> int:
        async with AsyncEngine(make_engine(threads=1)) as eng:
            await _collect(eng.generate([1, 2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
            return await eng._call(lambda e: torch.get_num_threads())

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 1
