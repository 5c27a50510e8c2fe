"""The control loop: observe -> decide -> act, with an injected clock.

``Controller.decide`` is pure (it only calls the policies); ``step`` observes a snapshot, decides
and calls the actuator; ``run`` repeats ``astep`` every ``autoscale_interval_s`` on the asyncio
loop. The real gateway passes an actuator that talks to node agents; the simulator can call the
policies directly or drive a ``Controller`` with a ``ManualClock`` and a simulated actuator.

Order inside one pass: memory plan (evictions free room, copy-backs start), scale-ins, then
scale-outs. An actuator call that raises is logged and recorded in ``TickResult.errors``; the other
actions of the pass still run and the next pass retries (the snapshot still shows the need). A
model's last scale time is remembered here and overlaid on the snapshot (``last_scale_at``) so the
scale-in cooldown works even when the observer does not track it.

Example::

    class MyActuator:
        def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None: ...
        def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None: ...
        def apply_memory(self, plan: MemoryPlan) -> None: ...

    ctl = Controller(observe=cluster.snapshot, actuator=MyActuator(), settings=cfg.control, clock=ManualClock())
    result = ctl.step()                 # one pass at clock.now()
    await ctl.run(stop_event)           # production loop (async actuators are awaited)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from lambdascale.clock import Clock
from lambdascale.control.autoscaler import autoscale
from lambdascale.control.decisions import MemoryPlan, ScaleDecision, ScalePlan
from lambdascale.control.memory import manage_memory
from lambdascale.control.placement import place_all
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import ClusterSnapshot
from lambdascale.control.timeline import ScaleTimeline

log = logging.getLogger(__name__)


def _nothing() -> None:
    """No follow-up after a successful action."""


class Actuator(Protocol):
    """What the controller asks the cluster to do. Methods may be sync or ``async``.

    They should start work and return quickly (a scale-out takes seconds; report its milestones by
    marking the ``timeline`` it was given). They must be idempotent with respect to work already in
    progress: a pass may repeat a copy-back the store has not yet reported as started.
    """

    def scale_out(self, plan: ScalePlan, timeline: ScaleTimeline) -> None | Awaitable[None]:
        """Start ``plan.targets`` loading (locally or by multicast from ``plan.sources``)."""
        ...

    def remove_instances(self, model: str, instance_ids: tuple[str, ...]) -> None | Awaitable[None]:
        """Drain then stop these instances (admitted requests finish)."""
        ...

    def apply_memory(self, plan: MemoryPlan) -> None | Awaitable[None]:
        """Apply evictions, then start the background copy-backs."""
        ...


@dataclass(frozen=True, slots=True)
class Decisions:
    """The pure part of one pass: what the policies decided for a snapshot at ``now``."""

    now: float
    scale: tuple[ScaleDecision, ...]
    plans: tuple[ScalePlan, ...]
    memory: MemoryPlan


@dataclass(frozen=True, slots=True)
class ActionError:
    """An actuator call that raised; ``action`` is scale_out, remove_instances or apply_memory."""

    action: str
    model: str | None
    message: str


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one pass observed, decided and started."""

    snapshot: ClusterSnapshot
    decisions: Decisions
    timelines: tuple[ScaleTimeline, ...]
    errors: tuple[ActionError, ...]


class Controller:
    """Observe -> decide -> act around the pure policies."""

    def __init__(
        self,
        observe: Callable[[], ClusterSnapshot],
        actuator: Actuator,
        settings: ControlSettings,
        clock: Clock,
        max_timelines: int = 1000,
    ) -> None:
        self._observe = observe
        self._actuator = actuator
        self.settings = settings
        self.clock = clock
        self._last_scale: dict[str, float] = {}
        self._next_event = 1
        self._starved: set[str] = set()
        #: recent scale-out timelines, oldest first (bounded so a long-running gateway does not grow)
        self.timelines: deque[ScaleTimeline] = deque(maxlen=max_timelines)

    # ---- pure part ---------------------------------------------------------------------------

    def overlay(self, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """The snapshot with ``last_scale_at`` raised to this controller's own record per model."""
        models = []
        changed = False
        for m in snapshot.models:
            mine = self._last_scale.get(m.name)
            if mine is not None and (m.last_scale_at is None or m.last_scale_at < mine):
                m = replace(m, last_scale_at=mine)
                changed = True
            models.append(m)
        return replace(snapshot, models=tuple(models)) if changed else snapshot

    def decide(self, snapshot: ClusterSnapshot, now: float) -> Decisions:
        """Run every policy on ``snapshot`` at ``now``; no side effects."""
        cfg = self.settings
        scale = autoscale(snapshot, cfg, now)
        plans = place_all(snapshot, scale, cfg, now)
        memory = manage_memory(snapshot, cfg, now)
        return Decisions(now=now, scale=scale, plans=plans, memory=memory)

    # ---- acting ------------------------------------------------------------------------------

    def _actions(self, d: Decisions) -> list[tuple[str, str | None, Callable[[], object], Callable[[], None]]]:
        """(action, model, call, on_success) in execution order."""
        acts: list[tuple[str, str | None, Callable[[], object], Callable[[], None]]] = []
        if not d.memory.is_noop:
            acts.append(("apply_memory", None, partial(self._actuator.apply_memory, d.memory), _nothing))
        for s in d.scale:
            if s.remove:
                acts.append((
                    "remove_instances",
                    s.model,
                    partial(self._actuator.remove_instances, s.model, s.remove),
                    partial(self._last_scale.__setitem__, s.model, d.now),
                ))
        for plan in d.plans:
            if not plan.targets:
                # Warn once per model until a scale-out of it goes through again (no log flood at 2 Hz).
                if plan.model not in self._starved:
                    log.warning("scale-out of %s: no node has free GPUs (%d unplaced)", plan.model, plan.unplaced)
                    self._starved.add(plan.model)
                continue
            self._starved.discard(plan.model)
            tl = ScaleTimeline(self._next_event, plan.model, d.now, tuple(t.node for t in plan.targets))
            self._next_event += 1

            def ok(plan: ScalePlan = plan, tl: ScaleTimeline = tl) -> None:
                self._last_scale[plan.model] = d.now
                self.timelines.append(tl)

            acts.append(("scale_out", plan.model, partial(self._actuator.scale_out, plan, tl), ok))
        return acts

    def _failed(self, action: str, model: str | None, e: BaseException) -> ActionError:
        log.error("controller: %s for %s failed: %s", action, model or "memory", e, exc_info=e)
        return ActionError(action, model, f"{type(e).__name__}: {e}")

    def _prepare(self, now: float | None) -> tuple[ClusterSnapshot, Decisions]:
        t = self.clock.now() if now is None else now
        snapshot = self.overlay(self._observe())
        return snapshot, self.decide(snapshot, t)

    def _new_timelines(self, before: int) -> tuple[ScaleTimeline, ...]:
        return tuple(tl for tl in self.timelines if tl.event_id >= before)

    def step(self, now: float | None = None) -> TickResult:
        """One pass with a synchronous actuator (an actuator returning an awaitable is an error here: use ``astep``)."""
        snapshot, d = self._prepare(now)
        first_event = self._next_event
        errors: list[ActionError] = []
        for action, model, call, on_success in self._actions(d):
            try:
                result = call()
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(f"actuator.{action} returned an awaitable; drive this controller with astep()/run()")
                on_success()
            except Exception as e:  # recorded and logged; the pass goes on and the next one retries
                errors.append(self._failed(action, model, e))
        return TickResult(snapshot, d, self._new_timelines(first_event), tuple(errors))

    async def astep(self, now: float | None = None) -> TickResult:
        """One pass; awaitable actuator results are awaited in order."""
        snapshot, d = self._prepare(now)
        first_event = self._next_event
        errors: list[ActionError] = []
        for action, model, call, on_success in self._actions(d):
            try:
                result = call()
                if inspect.isawaitable(result):
                    await result
                on_success()
            except Exception as e:  # recorded and logged; the pass goes on and the next one retries
                errors.append(self._failed(action, model, e))
        return TickResult(snapshot, d, self._new_timelines(first_event), tuple(errors))

    async def run(self, stop: asyncio.Event, on_tick: Callable[[TickResult], None] | None = None) -> None:
        """Pass every ``autoscale_interval_s`` until ``stop`` is set (ticks do not drift: next = start + k*period)."""
        period = self.settings.autoscale_interval_s
        sleep = getattr(self.clock, "sleep", None) or asyncio.sleep
        start = self.clock.now()
        k = 0
        while not stop.is_set():
            result = await self.astep()
            if on_tick is not None:
                on_tick(result)
            k += 1
            delay = start + k * period - self.clock.now()
            if delay < 0:  # a slow pass: skip missed ticks instead of bursting to catch up
                k += int(-delay // period) + 1
                delay = start + k * period - self.clock.now()
            # Sleep on the injected clock, but wake at once when stop is set.
            sleeper = asyncio.ensure_future(sleep(delay))
            stopper = asyncio.ensure_future(stop.wait())
            _, pending = await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


__all__ = ["ActionError", "Actuator", "Controller", "Decisions", "TickResult"]
