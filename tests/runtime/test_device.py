"""The node's device: one step at a time, cross-node stages first, emulated waits lent to them."""

from __future__ import annotations

import asyncio
import time

import pytest

from lambdascale.runtime.device import NORMAL, URGENT, Device


def test_steps_never_overlap_and_urgent_ones_go_first() -> None:
    async def main() -> list[str]:
        dev = Device()
        order: list[str] = []
        gate = asyncio.Event()

        async def run(name: str, prio: int) -> None:
            async with dev.step(prio):
                assert dev.busy
                order.append(name)
                if name == "first":
                    await gate.wait()

        first = asyncio.create_task(run("first", NORMAL))
        await asyncio.sleep(0)  # "first" holds the device
        tasks = [asyncio.create_task(run(n, p)) for n, p in
                 (("n1", NORMAL), ("u1", URGENT), ("n2", NORMAL), ("u2", URGENT))]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *tasks)
        assert not dev.busy
        return order

    assert asyncio.run(main()) == ["first", "u1", "u2", "n1", "n2"]


def test_a_normal_steps_emulated_wait_lends_the_device_and_ends_later_by_as_much() -> None:
    async def main() -> tuple[float, float, float, int]:
        dev = Device()
        urgent_in = asyncio.Event()
        t0 = time.monotonic()
        marks: dict[str, float] = {}

        async def normal() -> float:
            async with dev.step(NORMAL) as st:
                urgent_in.set()
                await st.hold_until(1.0)
                marks["normal_end"] = time.monotonic() - t0
                return st.lent_s

        async def urgent() -> None:
            await urgent_in.wait()
            await asyncio.sleep(0.1)  # arrives during the normal step's emulated wait
            async with dev.step(URGENT) as st:
                marks["urgent_start"] = time.monotonic() - t0
                await st.hold_until(0.2)
                marks["urgent_end"] = time.monotonic() - t0

        lent, _ = await asyncio.gather(normal(), urgent())
        return lent, marks["urgent_start"], marks["normal_end"] - marks["urgent_end"], dev.preemptions

    lent, urgent_start, tail, preemptions = asyncio.run(main())
    assert preemptions == 1
    assert urgent_start < 0.9  # it did not wait for the normal step's 1.0 s
    assert lent >= 0.2  # the urgent step's time
    assert tail >= 0.5  # the rest of the normal step's time (about 0.9 s) came after the urgent one


def test_an_urgent_steps_wait_is_not_interrupted() -> None:
    async def main() -> list[str]:
        dev = Device()
        order: list[str] = []
        started = asyncio.Event()

        async def first() -> None:
            async with dev.step(URGENT) as st:
                started.set()
                await st.hold_until(0.2)
                order.append("u1")

        async def second() -> None:
            await started.wait()
            async with dev.step(URGENT):
                order.append("u2")

        await asyncio.gather(first(), second())
        assert dev.preemptions == 0
        return order

    assert asyncio.run(main()) == ["u1", "u2"]


def test_a_step_cancelled_while_waiting_to_take_the_device_back_releases_nothing() -> None:
    async def main() -> None:
        dev = Device()
        in_urgent = asyncio.Event()
        leave_urgent = asyncio.Event()

        in_normal = asyncio.Event()

        async def normal() -> None:
            async with dev.step(NORMAL) as st:
                in_normal.set()
                await st.hold_until(5.0)

        async def urgent() -> None:
            async with dev.step(URGENT):
                in_urgent.set()
                await leave_urgent.wait()

        n = asyncio.create_task(normal())
        await in_normal.wait()
        u = asyncio.create_task(urgent())
        await in_urgent.wait()  # the normal step lent the device and waits to take it back
        n.cancel()
        with pytest.raises(asyncio.CancelledError):
            await n
        assert dev.busy  # still the urgent step's
        third = asyncio.create_task(_briefly(dev))
        await asyncio.sleep(0.05)
        assert not third.done()  # it waits for the urgent step
        leave_urgent.set()
        await asyncio.gather(u, third)
        assert not dev.busy

    asyncio.run(asyncio.wait_for(main(), 10))


async def _briefly(dev: Device) -> None:
    async with dev.step(NORMAL):
        pass


def test_unknown_priority_is_refused() -> None:
    async def main() -> None:
        async with Device().step(1):
            pass

    with pytest.raises(ValueError, match="URGENT or NORMAL"):
        asyncio.run(main())
