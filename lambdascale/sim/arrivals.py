"""Arrivals and dispatch: the gateway's FIFO of held requests and late binding.

The gateway binds late (``sim.late_binding``): requests wait in its FIFO until an instance or
pipeline can start them in its next step (``control.router.dispatch``, the gateway's policy), so
capacity that appears later drains the backlog; an arrival that finds no instance runs a
controller pass at once (``sim.kick_from_zero``). Requests arriving at one instant are dispatched
together, after the last of them, so a burst starts as one batch.
"""

from __future__ import annotations

import itertools

from lambdascale.control.router import QueuedRequest, Waiting, dispatch, fits_next_step
from lambdascale.control.spec import InstanceState
from lambdascale.sim.events import Priority
from lambdascale.sim.instances import Instances
from lambdascale.sim.state import ROUTABLE, Inst, Req, prefill_tokens


class Arrivals(Instances):
    """Requests arriving, waiting at the gateway and being dispatched to instances."""

    def _arrive(self, r: Req) -> None:
        now = self.loop.now()
        self.arrived += 1
        self._arrivals_in_sample += 1
        self.last_request_at = now
        self._recent.append(now)
        self.held.append(r)
        if self.s.kick_from_zero and not any(i.state is not InstanceState.DRAINING for i in self.insts.values()):
            # The gateway runs an out-of-band controller pass when a request finds no instance at
            # all (scale from zero), as the real gateway does, instead of waiting for the next tick.
            self._control_pass()
        if self._dispatch is None:  # once every request of this instant is queued: a burst starts as one batch
            self._dispatch = self.loop.schedule(now, Priority.DISPATCH, self._dispatch_arrivals)

    def _dispatch_arrivals(self) -> None:
        self._dispatch = None
        self._pump()

    def _pump(self) -> None:
        """Dispatch held requests in arrival order (``control.router.dispatch``) until none fits.

        With late binding (``sim.late_binding``, every system) an instance takes a request only
        when it can start it at its next step, so a backlog waits here and drains onto whichever
        instance or pipeline frees up or appears first; with early binding any free slot binds it.
        """
        if not self.held:
            return
        free = 0
        waiting: dict[str, Waiting] = {}
        ready = False
        for i in self.insts.values():
            if i.state not in ROUTABLE or i.outstanding >= i.capacity:
                continue
            free += i.capacity - i.outstanding
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
        n = min(len(self.held), free)
        queue = [QueuedRequest(str(r.idx), prefill_tokens(r), r.inp + r.out - r.generated)
                 for r in itertools.islice(self.held, n)]
        res = dispatch(queue, self._model_view(), self.cfg, self.loop.now(), waiting)
        touched: dict[str, Inst] = {}
        for a in res.assignments:
            r = self.held.popleft()  # assignments are a prefix of the queue, in order
            assert str(r.idx) == a.request_id
            inst = self.insts[a.instance_id]
            inst.pending.append(r)
            inst.view = None
            touched[inst.id] = inst
        for inst in touched.values():  # a burst to an idle instance prefills together
            if inst.event is None:
                self._start_step(inst)
            else:
                self._cut_segment(inst)

