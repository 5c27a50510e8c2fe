"""Arrivals and dispatch: the gateway's FIFO of held requests and late binding.

Each model has its own FIFO at the gateway (``ModelRun.held``). The gateway binds late (``sim.late_binding``): requests wait in its FIFO until an instance or
pipeline can start them in its next step (``control.router.dispatch``, the gateway's policy), so
capacity that appears later drains the backlog; an arrival that finds no instance runs a
controller pass at once (``sim.kick_from_zero``). Requests arriving at one instant are dispatched
together, after the last of them, so a burst starts as one batch.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from lambdascale.control.router import QueuedRequest, Waiting, dispatch, fits_next_step
from lambdascale.control.spec import InstanceState
from lambdascale.pipe.serving import kept_slots
from lambdascale.sim.events import Priority
from lambdascale.sim.instances import Instances
from lambdascale.sim.state import ROUTABLE, Inst, ModelRun, Req, prefill_tokens


class Arrivals(Instances):
    """Requests arriving, waiting at the gateway (one FIFO per model) and being dispatched."""

    def _arrive(self, r: Req) -> None:
        now = self.loop.now()
        m = r.m
        assert m is not None
        self.arrived += 1
        self._arrivals_in_sample += 1
        m.last_request_at = now
        m.recent.append(now)
        m.held.append(r)
        if self.s.kick_from_zero and not any(i.state is not InstanceState.DRAINING for i in m.insts.values()):
            # The gateway runs an out-of-band controller pass when a request finds no instance of
            # its model at all (scale from zero), as the real gateway does, instead of waiting
            # for the next tick.
            self._control_pass(only=m)
        self._to_dispatch[m.idx] = m
        if self._dispatch is None:  # once every request of this instant is queued: a burst starts as one batch
            self._dispatch = self.loop.schedule(now, Priority.DISPATCH, self._dispatch_arrivals)

    def _dispatch_arrivals(self) -> None:
        self._dispatch = None
        models, self._to_dispatch = list(self._to_dispatch.values()), {}
        for m in models:
            self._pump(m)

    def _pump(self, m: ModelRun | None = None) -> None:
        """Dispatch held requests of ``m`` (every model with a queue: None) in arrival order
        (``control.router.dispatch``) until none fits.

        With late binding (``sim.late_binding``, every system) an instance takes a request only
        when it can start it at its next step, so a backlog waits here and drains onto whichever
        instance or pipeline frees up or appears first; with early binding any free slot binds it.
        While a pipeline runs, its receivers' full instances keep their share of slots for its
        requests' KV (``pipe.serving.kept_slots``, as the core's dispatch).
        """
        if m is None:
            for mm in self.models:
                if mm.held:
                    self._pump(mm)
            return
        if not m.held:
            return
        kept = self._kept(m)
        free = 0
        waiting: dict[str, Waiting] = {}
        ready = False
        for i in m.insts.values():
            busy = i.outstanding + kept.get(i.id, 0)
            if i.state not in ROUTABLE or busy >= i.capacity:
                continue
            free += i.capacity - busy
            if i.pending:
                w = Waiting(len(i.pending), sum(prefill_tokens(r) for r in i.pending))
                waiting[i.id] = w
                ready = ready or fits_next_step(w, 1, i.slots, self.cfg)
            else:
                ready = True
        # A pure shortcut: when no instance could take even a one-token request, dispatch would
        # assign nothing, so skip building the views.
        if not ready:
            return
        n = min(len(m.held), free)
        queue = [QueuedRequest.of(str(r.idx), prefill_tokens(r), r.out - r.generated)
                 for r in itertools.islice(m.held, n)]
        view = self._model_view(m)
        if kept:  # kept slots count as outstanding for dispatch only (the autoscaler sees the real load)
            view = replace(view, instances=tuple(
                replace(v, outstanding_requests=v.outstanding_requests + kept[v.id]) if v.id in kept else v
                for v in view.instances))
        res = dispatch(queue, view, self.cfg, self.loop.now(), waiting)
        touched: dict[str, Inst] = {}
        for a in res.assignments:
            r = m.held.popleft()  # assignments are a prefix of the queue, in order
            assert str(r.idx) == a.request_id
            inst = m.insts[a.instance_id]
            inst.pending.append(r)
            self._dirty(inst)
            touched[inst.id] = inst
        for inst in touched.values():  # a burst to an idle instance prefills together
            if inst.event is None:
                self._start_step(inst)
            else:
                self._cut_segment(inst)

    def _kept(self, m: ModelRun) -> dict[str, int]:
        """Slots each full instance of ``m`` keeps for the requests of its λPipe pipelines."""
        pipes = [(i.outstanding, i.receivers) for i in m.insts.values() if i.state is InstanceState.PIPELINED]
        if not pipes:
            return {}
        full_on = {i.stages[0][0]: i.id for i in m.insts.values()
                   if i.state is InstanceState.FULL and len(i.stages) == 1}
        return kept_slots(pipes, full_on, self.s.kv_move)
