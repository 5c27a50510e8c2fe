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
"""

from __future__ import annotations

from dataclasses import replace

from lambdascale.control.settings import ControlSettings, RouteMetric
from lambdascale.control.snapshot import (
    ClusterSnapshot,
    InstanceState,
    InstanceView,
    ModelView,
    RejectReason,
    RouteDecision,
)


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


__all__ = ["route", "route_many", "route_model"]
