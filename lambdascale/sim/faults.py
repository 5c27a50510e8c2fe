"""Node loss in the simulator: nodes that pause or crash, are declared dead, and return, by the
runtime's membership rules (:mod:`lambdascale.membership`), so a policy tested here sees nodes
leave and come back as the running system does. A node is shared by many models: a fault takes
every model's instances on it, and what it keeps is kept per model.

``sim.node_faults`` lists the faults (``pause@30:2+20,crash@60:3``). At a fault the node's
instances of every model stop where they are (tokens computed so far count; a prefill in progress
is lost), and so do the λPipe pipelines with a stage on it. A pause shorter than the heartbeat
limit only delays the node's own steps by as much (nothing is declared); past it the node is
declared dead after ``dead_after_s``, a crash at once (its control channel closes). A dead node's
requests go back to their models' gateway queues with their token state (recomputed wherever they
land), it holds nothing in the snapshot (no placement target, no multicast source), its GPUs are
free, and the scale-outs whose pipeline planner counted it re-plan without it
(``PipelinePlanner.remove_node``, as the core's scale-out does on ``NodeLost``). It returns as a
new incarnation: a paused node when it continues plus ``sim.rejoin_s``, with its memory as it
stood (each model's complete device copy counts as a GPU-tier holding without an instance, its
host and SSD copies stay, copies being written go on); a crashed one after the restart backoff
plus ``sim.agent_start_s``, with only its complete SSD copies (:func:`lambdascale.membership.tiers_kept`;
a copy being written died with its writer). The controller gets a pass when a node dies and when
it returns, as the core kicks one.

Limits (kept small): a node that dies while it is a multicast's source or receiver, or while it
loads a model, stays in that transfer's flows (the runtime re-plans around it; chunks landing on
it are dropped); ``faults_in_multicast`` counts such faults.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lambdascale.control.spec import InstanceState, Tier
from lambdascale.errors import LambdaScaleError
from lambdascale.membership import FaultKind, MemberState, dead_after_s, respawn_delay_s, tiers_kept
from lambdascale.pipe.pipeline_types import Pipeline
from lambdascale.sim.events import Priority
from lambdascale.sim.scaleouts import ScaleOuts
from lambdascale.sim.state import Inst, ModelRun, Req


@dataclass(frozen=True)
class NodeFault:
    kind: FaultKind
    at: float
    node: int
    seconds: float = 0.0  # a pause's length


def parse_faults(spec: str, nodes: int) -> list[NodeFault]:
    """``KIND@SECONDS:NODE[+SECONDS]``, comma-separated; errors name the bad entry."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        try:
            kind, rest = item.split("@", 1)
            at, rest = rest.split(":", 1)
            node, _, dur = rest.partition("+")
            f = NodeFault(FaultKind(kind), float(at), int(node), float(dur) if dur else 0.0)
        except ValueError:
            raise LambdaScaleError(f"sim.node_faults: {item!r} is not KIND@SECONDS:NODE[+SECONDS] "
                                   "with KIND pause or crash") from None
        if not 0 <= f.node < nodes or f.at < 0 or (f.kind is FaultKind.PAUSE and f.seconds <= 0):
            raise LambdaScaleError(f"sim.node_faults: {item!r}: node must be in [0, {nodes}), a pause needs +SECONDS > 0")
        out.append(f)
    return out


class Faults(ScaleOuts):
    """Nodes that leave and return (see the module docstring)."""

    def _schedule_faults(self) -> None:
        #: (time, node, incarnation, state) of every membership change
        self.member_events: list[tuple[float, int, int, MemberState]] = []
        self.faults_in_multicast = 0
        self._stalled: dict[int, list[Req]] = {}
        for f in parse_faults(self.s.node_faults, len(self.nodes)):
            self.loop.schedule(f.at, Priority.STATE, self._fault, f)

    def _set_member(self, node: int, state: MemberState) -> None:
        self.member[node] = state
        self._touch(self.nodes[node])
        self.member_events.append((self.loop.now(), node, self.incarnation[node], state))

    def _fault(self, f: NodeFault) -> None:
        if self.member[f.node] is not MemberState.ALIVE:
            return  # already down
        node = self.nodes[f.node]
        limit = dead_after_s(self.s.heartbeat_s, self.s.heartbeat_misses)
        if f.kind is FaultKind.PAUSE and f.seconds <= limit:
            # a short pause: every model's steps on the node end that much later, nobody notices
            for name in list(node.insts):
                self._lend(f.node, self.by_name[name], f.seconds)
            return
        if (any(v > 0 for v in node.source_busy.values())
                or any(i.state is InstanceState.LOADING for i in node.insts.values())):
            self.faults_in_multicast += 1
        own = list(node.insts.values())  # drained ones still feeding a multicast included
        stalled: list[Req] = []
        for inst in [i for i in self.insts.values() if f.node in i.nodes]:
            stalled.extend(self._stop(inst))
        for inst in own:
            full = inst.state is not InstanceState.LOADING and len(node.chunks.get(inst.m.name, ())) == inst.m.model.n_chunks
            self._free_gpu(node, inst)
            if full:  # the device copy stays where it is until the node is declared dead
                node.chunks[inst.m.name] = set(range(inst.m.model.n_chunks))
        for key in [k for k in self._lent_s if k[0] == f.node]:
            del self._lent_s[key]  # its device's lending ends with its steps
        self._stalled[f.node] = stalled
        self._set_member(f.node, MemberState.SUSPECT)  # silent from now on
        detect = 0.0 if f.kind is FaultKind.CRASH else limit
        self.loop.after(detect, Priority.STATE, self._declare_dead, f)

    def _stop(self, inst: Inst) -> list[Req]:
        """An instance (or pipeline) on a node that stopped: what its segment computed so far
        counts, the rest of its requests leave with their token state (a prefill in progress is
        lost). Its pipeline's helpers on other nodes finish the pass in progress, no more."""
        active = inst.event is not None
        self.loop.cancel(inst.event)
        inst.event = None
        out = self._settle_cut(inst, self.loop.now()) if active else []
        for r in inst.running:
            r.migrations += 1
            r.resume = True
        self.migrations += len(inst.running)
        for r in inst.pending:
            if r.kv_ready:  # its shipped KV cache is gone with the node: recompute it
                r.kv_ready, r.resume = False, True
        out.extend(inst.running)
        out.extend(inst.pending)
        inst.running, inst.pending, inst.seg_new, inst.seg_first = [], deque(), [], []
        inst.kv_used = 0
        self._drop_inst(inst)
        self._dirty(inst)
        return out

    def _declare_dead(self, f: NodeFault) -> None:
        self._set_member(f.node, MemberState.DEAD)
        models: dict[int, ModelRun] = {}
        for r in reversed(self._stalled.pop(f.node, [])):
            assert r.m is not None
            r.m.held.appendleft(r)
            models[r.m.idx] = r.m
        self._forget(f.node)
        self._keep(f.node, f.kind)
        if f.kind is FaultKind.CRASH:
            back = respawn_delay_s(1, self.s.respawn_backoff_s, 1e9) + self.s.agent_start_s
        else:
            back = max(0.0, f.at + f.seconds - self.loop.now()) + self.s.rejoin_s
        self.loop.after(back, Priority.STATE, self._rejoin, f.node)
        self._control_pass()  # the core kicks the controller when a node dies

    def _forget(self, n: int) -> None:
        """Every scale-out whose pipeline planner counts ``n`` (a receiver or a helper) re-plans
        without it: pipelines through it dissolve, replacements form from the survivors."""
        for event_id, (planner, tl, _, _) in list(self._pipelines.items()):
            if n in planner.holdings() or n in planner.helpers:
                p = planner.remove_node(n)
                if p is not None:
                    self._apply_pipelines(self.by_name[tl.model], event_id, p.form, p.dissolve)

    def _keep(self, n: int, kind: FaultKind) -> None:
        """What the node still holds when it returns, every model alike: the tiers
        ``tiers_kept(kind)`` names; a process that crashed lost the copies it was writing, in
        every tier (a partial SSD file fails its checksum)."""
        node = self.nodes[n]
        kept = tiers_kept(kind)
        if Tier.GPU.value not in kept:
            node.chunks.clear()  # no instance is left on it: these are kept device copies
        if Tier.HOST.value not in kept:
            node.host.clear()
            node.host_partial.clear()
            node.host_used = 0
        if Tier.SSD.value not in kept:
            node.ssd.clear()
            node.ssd_partial.clear()
            node.ssd_used = 0
        elif kind is FaultKind.CRASH and node.ssd_partial:
            node.ssd_used -= sum(self.by_name[name].model.nbytes for name in node.ssd_partial)
            node.ssd_partial.clear()
        self._touch(node)

    def _apply_pipelines(self, m: ModelRun, event_id: int, form: tuple[Pipeline, ...],
                         dissolve: tuple[Pipeline, ...]) -> None:
        """As the scale-out's, but a pipeline is never formed with a stage on a node that is down."""
        if any(s is not MemberState.ALIVE for s in self.member.values()):
            form = tuple(p for p in form if all(self.member[s.node] is MemberState.ALIVE for s in p.stages))
        super()._apply_pipelines(m, event_id, form, dissolve)

    def _rejoin(self, n: int) -> None:
        self.incarnation[n] += 1
        self._set_member(n, MemberState.ALIVE)
        self._control_pass()  # and when one comes back
