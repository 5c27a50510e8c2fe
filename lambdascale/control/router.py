"""Router: where one request goes, as a pure function of (snapshot or model view, config, now).

- Candidates are the model's routable instances (``FULL`` instances and, while scaling, ``PIPELINED``
  λPipe pipelines) with a free slot (``outstanding_requests < capacity``).
- Among them the least outstanding work wins: with ``router_metric=requests`` the lowest
  ``outstanding_requests / capacity``, with ``tokens`` the fewest ``outstanding_tokens``; ties go to
  full instances over pipelines (no inter-stage hops), then the other metric, then the id.
- With no free slot (all busy, or zero instances while one starts), the request is HELD if the
  model's queue (``queue_len``, held requests included) is below ``router_max_held``, else
  REJECTed with ``HOLD_QUEUE_FULL`` (the gateway answers 429 with Retry-After). A held request for
  a model with zero instances is what makes the autoscaler start one.
- An unknown model is REJECTed with ``UNKNOWN_MODEL`` (404); a model with ``max_instances == 0``
  and nothing running with ``NOT_SCALABLE``.

The caller admits the request (or enqueues it) and reflects that in the next snapshot; routing a
burst one request at a time against an unchanged view would send it all to one instance, so
callers that route several requests between snapshots use :func:`route_many`.

Example::

    d = route(snapshot, "llama2-7b", cfg, now)
    if d.kind is RouteKind.INSTANCE: send(d.instance_id)
    elif d.kind is RouteKind.HOLD: queue.append(request)
    else: reply_429_or_404(d.reject_reason, d.detail)

Late binding (:func:`dispatch`, ``control.router_late_binding``): the gateway keeps a per-model
FIFO of admitted requests and, whenever capacity may have appeared (a step started, a request
finished, an instance or pipeline became routable), asks ``dispatch`` which queued requests go
where. An instance takes a request only while it has a free slot *and* could start it in its next
step (the prompt tokens dispatched to it but not yet started stay within
``router_max_waiting_tokens``, once per step the instance runs at once: a pipeline's
micro-batches), so a burst waits at the gateway rather than behind one instance's
prefills, and a new instance drains the backlog the moment it is routable. Among the instances that
qualify, the choice is the same least-outstanding-work rule as :func:`route_model`.

Example (gateway loop)::

    out = dispatch(queue, snapshot.model(name), cfg, now, waiting=not_started_by_instance)
    for a in out.assignments: send(a.request_id, a.instance_id)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from lambdascale.control.decisions import RejectReason, RouteDecision
from lambdascale.control.settings import ControlSettings, RouteMetric
from lambdascale.control.snapshot import ClusterSnapshot, InstanceView, ModelView
from lambdascale.control.spec import InstanceState


def _work_key(inst: InstanceView, metric: RouteMetric) -> tuple[float, int, float, str]:
    by_requests = inst.outstanding_requests / inst.capacity
    pipe = 0 if inst.state is InstanceState.FULL else 1
    if metric is RouteMetric.TOKENS:
        return (float(inst.outstanding_tokens), pipe, by_requests, inst.id)
    return (by_requests, pipe, float(inst.outstanding_tokens), inst.id)


def route_model(model: ModelView, cfg: ControlSettings, now: float) -> RouteDecision:
    """Route one request of ``model`` (the fast path: the router only needs the model's view)."""
    del now  # routing does not depend on time today; kept for the uniform policy signature
    free = [i for i in model.instances if i.routable and i.outstanding_requests < i.capacity]
    if free:
        best = min(free, key=lambda i: _work_key(i, cfg.router_metric))
        return RouteDecision.to(best.id, detail=f"{best.state.value}, {best.outstanding_requests}/{best.capacity} busy")
    if model.spec.max_instances == 0 and not any(i.routable or i.counts_as_instance for i in model.instances):
        return RouteDecision.reject(RejectReason.NOT_SCALABLE, f"model {model.name!r} has max_instances=0")
    if model.queue_len < cfg.router_max_held:
        starting = not any(i.routable for i in model.instances)
        why = "no instance yet, one is starting" if starting else "all instances busy"
        return RouteDecision.hold(f"{why}; held {model.queue_len + 1}/{cfg.router_max_held}")
    return RouteDecision.reject(
        RejectReason.HOLD_QUEUE_FULL,
        f"model {model.name!r}: {model.queue_len} requests held, limit control.router_max_held={cfg.router_max_held}",
    )


def route(snapshot: ClusterSnapshot, model: str, cfg: ControlSettings, now: float) -> RouteDecision:
    """Route one request for the model named ``model``."""
    view = snapshot.model(model)
    if view is None:
        known = ", ".join(m.name for m in snapshot.models) or "none"
        return RouteDecision.reject(RejectReason.UNKNOWN_MODEL, f"model {model!r} is not deployed (deployed: {known})")
    return route_model(view, cfg, now)


def route_many(
    model: ModelView, n: int, cfg: ControlSettings, now: float, request_tokens: int = 0
) -> tuple[RouteDecision, ...]:
    """Route ``n`` requests arriving together, each one seeing the slots and queue the previous took.

    ``request_tokens`` (prompt + max_tokens of each request) is added to the chosen instance's
    outstanding tokens, which matters with ``router_metric=tokens``.
    """
    out: list[RouteDecision] = []
    view = model
    for _ in range(n):
        d = route_model(view, cfg, now)
        out.append(d)
        if d.instance_id is not None:
            insts = tuple(
                replace(
                    i,
                    outstanding_requests=i.outstanding_requests + 1,
                    outstanding_tokens=i.outstanding_tokens + request_tokens,
                )
                if i.id == d.instance_id else i
                for i in view.instances
            )
            view = replace(view, instances=insts, in_flight=view.in_flight + 1)
        elif d.reject_reason is None:
            view = replace(view, queue_len=view.queue_len + 1)
    return tuple(out)


def work_tokens(to_compute: int, to_generate: int) -> int:
    """A request's outstanding work as ``router_metric=tokens`` counts it: the tokens its instance
    still computes (a prefill: the prompt, plus the outputs a resumed request recomputes, less
    what is cached; one token for a running request's next decode) plus the tokens it may still
    generate (``max_tokens`` less its outputs; never negative). The gateway's and the simulator's
    instance views and queued requests count with it."""
    if to_compute < 0:
        raise ValueError(f"tokens to compute must be >= 0, got {to_compute}")
    return to_compute + max(to_generate, 0)


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting at the gateway: its id and the prompt tokens its first step prefills
    (prompt + already generated tokens for a request resuming elsewhere). Build it with
    :meth:`of`."""

    id: str
    prompt_tokens: int
    total_tokens: int = 0  # prompt_tokens + tokens still to generate (work_tokens), for router_metric=tokens

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.total_tokens < 0:
            raise ValueError(f"queued request {self.id!r}: token counts must be >= 0 "
                             f"(prompt_tokens={self.prompt_tokens}, total_tokens={self.total_tokens})")

    @classmethod
    def of(cls, id: str, prefill: int, to_generate: int) -> "QueuedRequest":
        """A queued request whose first step prefills ``prefill`` tokens (its prompt, plus the
        outputs it already has when it resumes) and that may still generate ``to_generate``: its
        size is all of that (:func:`work_tokens`), the recomputed outputs included, as an
        instance's view counts the same request once admitted."""
        return cls(id, prefill, work_tokens(prefill, to_generate))


@dataclass(frozen=True)
class Waiting:
    """Work dispatched to an instance that it has not started yet (no prefill step begun)."""

    requests: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Assignment:
    """Send queued request ``request_id`` to instance ``instance_id``."""

    request_id: str
    instance_id: str


@dataclass(frozen=True)
class DispatchResult:
    """What :func:`dispatch` decided: assignments in queue order; ``held`` requests stay queued."""

    assignments: tuple[Assignment, ...]
    held: int


def fits_next_step(waiting: Waiting, prompt_tokens: int, step_slots: int, cfg: ControlSettings) -> bool:
    """Late binding's test (``control.router_late_binding``): an instance with ``waiting`` work not
    started yet can start a request of ``prompt_tokens`` more in its next step. The next step
    starts whatever is waiting; one more request fits if the step's prefill budget allows it (a
    pipeline starts a step per micro-batch, ``step_slots``, each with a budget of
    ``router_max_waiting_tokens``). An instance with nothing waiting always takes one (a long
    prompt runs alone). Always True with early binding. Slots are the caller's to check."""
    if not cfg.router_late_binding:
        return True
    budget = cfg.router_max_waiting_tokens * step_slots
    return waiting.prompt_tokens == 0 or waiting.prompt_tokens + prompt_tokens <= budget


def _can_take(inst: InstanceView, w: Waiting, req: QueuedRequest, cfg: ControlSettings) -> bool:
    if not inst.routable or inst.outstanding_requests >= inst.capacity:
        return False
    return fits_next_step(w, req.prompt_tokens, inst.step_slots, cfg)


def dispatch(
    queue: Sequence[QueuedRequest],
    model: ModelView,
    cfg: ControlSettings,
    now: float,
    waiting: Mapping[str, Waiting] | None = None,
) -> DispatchResult:
    """Assign queued requests, in FIFO order, to instances that can take them now.

    ``queue`` is the model's gateway queue (oldest first); ``model`` the current view (its
    instances' ``outstanding_requests`` include work already dispatched); ``waiting`` maps an
    instance id to what was dispatched to it but not started (missing ids: nothing). Each
    assignment is reflected in the views the next request sees, so a burst spreads. Dispatch stops
    at the first request no instance can take (no overtaking: the oldest request goes first).
    With ``router_late_binding`` off, "can take" is just a free slot (the same candidates as
    :func:`route_model`); with it on, also room in the instance's next prefill step.
    """
    del now
    waits: dict[str, Waiting] = dict(waiting or {})
    insts = {i.id: i for i in model.instances if i.routable}
    out: list[Assignment] = []
    for req in queue:
        cands = [i for i in insts.values() if _can_take(i, waits.get(i.id, Waiting()), req, cfg)]
        if not cands:
            break
        best = min(cands, key=lambda i: _work_key(i, cfg.router_metric))
        out.append(Assignment(req.id, best.id))
        insts[best.id] = replace(best, outstanding_requests=best.outstanding_requests + 1,
                                 outstanding_tokens=best.outstanding_tokens + req.total_tokens)
        w = waits.get(best.id, Waiting())
        waits[best.id] = Waiting(w.requests + 1, w.prompt_tokens + req.prompt_tokens)
    return DispatchResult(tuple(out), len(queue) - len(out))


__all__ = ["Assignment", "DispatchResult", "QueuedRequest", "Waiting", "dispatch", "fits_next_step", "route", "route_many",
           "route_model", "work_tokens"]
