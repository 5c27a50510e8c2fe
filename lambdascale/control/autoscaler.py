"""Autoscaler: how many instances each model should run, as a pure function of (snapshot, config, now).

Load is the number of requests a model must hold at once: ``in_flight + queue_len``, or, when the
observer knows the mean request duration, at least ``arrival_rate * service_time_s`` (Little's
law), so a rising arrival rate scales out before the queue builds.

The count follows a hysteresis band. With target concurrency ``T`` per instance:

- scale out at once (fast scaling is the point) to ``ceil(load / (T * scale_up_utilization))``;
- scale in only to a count that keeps utilization at or below ``scale_down_utilization`` (strictly
  below the scale-up threshold, so a steady load never bounces between two counts), only once
  ``scale_down_cooldown_s`` has passed since the model's last scale event, and at most
  ``scale_max_remove_per_tick`` instances per pass (default: straight to the target, since
  scaling out again is fast and idle GPUs are the cost);
- the last instance goes (scale-to-zero) only when no request arrived for ``keep_alive_s``;
- ``min_instances`` / ``max_instances`` (and ``scale_to_zero=False``: at least one) always hold.

Instances to remove are the least busy full instances first (then loading ones), ties broken by
id, so the choice is deterministic.

Example::

    decisions = autoscale(snapshot, ControlSettings(), now=12.5)
    for d in decisions:
        if d.add:
            plan = place(snapshot, d, settings, now)   # see placement.py
        elif d.remove:
            actuator.remove_instances(d.model, d.remove)
"""

from __future__ import annotations

import math

from lambdascale.control.decisions import ScaleDecision, ScaleReason
from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import ClusterSnapshot, InstanceView, ModelView
from lambdascale.control.spec import InstanceState


def model_load(model: ModelView) -> float:
    """Concurrent requests the model must serve: in-flight + queued, or the Little's-law estimate if larger."""
    observed = float(model.in_flight + model.queue_len)
    predicted = model.arrival_rate * model.service_time_s
    return max(observed, predicted)


def _instances_for(load: float, per_instance: float) -> int:
    """Fewest instances that carry ``load`` with ``per_instance`` requests each (0 for no load)."""
    if load <= 0:
        return 0
    # A tiny epsilon keeps exact multiples (load == n * per_instance) at n despite float rounding.
    return max(1, math.ceil(load / per_instance - 1e-9))


def _removal_order(instances: tuple[InstanceView, ...]) -> list[InstanceView]:
    """Least busy first; full instances before loading ones (a loading one may be needed soon); then by id."""
    state_rank = {InstanceState.FULL: 0, InstanceState.LOADING: 1}
    return sorted(
        instances,
        key=lambda i: (i.outstanding_requests, i.outstanding_tokens, state_rank.get(i.state, 2), i.id),
    )


def autoscale_model(model: ModelView, cfg: ControlSettings, now: float) -> ScaleDecision:
    """The scale decision for one model (see the module docstring for the rules)."""
    spec = model.spec
    counted = model.counted_instances
    n = len(counted)
    load = model_load(model)
    per_inst = float(spec.target_concurrency)
    floor = spec.floor

    def decide(desired: int, reason: ScaleReason, detail: str) -> ScaleDecision:
        if desired > n:
            add = min(desired - n, cfg.scale_max_add_per_tick)
            return ScaleDecision(model.name, n, n + add, add=add, reason=reason, detail=detail)
        if desired < n:
            k = n - desired
            if reason is not ScaleReason.MAX_INSTANCES:
                k = min(k, cfg.scale_max_remove_per_tick)
            victims = tuple(i.id for i in _removal_order(counted)[:k])
            return ScaleDecision(model.name, n, n - k, remove=victims, reason=reason, detail=detail)
        return ScaleDecision(model.name, n, n, reason=ScaleReason.STEADY, detail=detail)

    # Hard bounds first: the spec always holds, whatever the load or the cooldown.
    if n > spec.max_instances:
        return decide(spec.max_instances, ScaleReason.MAX_INSTANCES, f"{n} instances > max_instances={spec.max_instances}")

    up_needed = _instances_for(load, per_inst * cfg.scale_up_utilization)
    up_target = min(spec.max_instances, max(floor, up_needed))
    if up_target > n:
        reason = ScaleReason.LOAD if up_needed > n else ScaleReason.MIN_INSTANCES
        return decide(up_target, reason, f"load={load:g} needs {up_needed} at target_concurrency={spec.target_concurrency}")

    # Scale in: never below the floor; the last instance only after keep-alive; cooldown after any scale event.
    down_fit = _instances_for(load, per_inst * cfg.scale_down_utilization)
    idle_for = math.inf if model.last_request_at is None else now - model.last_request_at
    keep_one = 1 if (n > 0 and idle_for < spec.keep_alive_s) else 0
    down_target = max(floor, down_fit, keep_one)
    if down_target >= n:
        return decide(n, ScaleReason.STEADY, f"load={load:g} fits {n} instances")
    since_scale = math.inf if model.last_scale_at is None else now - model.last_scale_at
    if since_scale < cfg.scale_down_cooldown_s:
        return decide(n, ScaleReason.STEADY, f"scale-in to {down_target} waits for cooldown ({since_scale:.3g}s < {cfg.scale_down_cooldown_s}s)")
    if down_target == 0:
        return decide(0, ScaleReason.KEEP_ALIVE_EXPIRED, f"idle for {idle_for:.3g}s >= keep_alive_s={spec.keep_alive_s}")
    return decide(down_target, ScaleReason.UNDERLOADED, f"load={load:g} fits {down_target} at utilization <= {cfg.scale_down_utilization}")


def autoscale(snapshot: ClusterSnapshot, cfg: ControlSettings, now: float) -> tuple[ScaleDecision, ...]:
    """One decision per deployed model, in snapshot order (no-ops included; filter with ``is_noop``)."""
    return tuple(autoscale_model(m, cfg, now) for m in snapshot.models)


__all__ = ["autoscale", "autoscale_model", "model_load"]
