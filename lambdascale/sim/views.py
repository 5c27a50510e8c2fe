"""The control plane's view of the simulated cluster: the :class:`ClusterSnapshot` every policy
(autoscaler, placement, memory manager, router) decides on, built from the simulation's state.

Views are cached: an instance's is rebuilt only after it changed (``_dirty``), a model's only
when its version, queue, rate window or timestamps moved, a node's only after ``_touch`` bumped
its version, so a controller pass over many models on a large cluster costs little when little
changed. Every mutation of a node's holdings, GPUs or LRU stamps goes through ``_touch``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdascale.control.router import work_tokens
from lambdascale.control.snapshot import ClusterSnapshot, Holding, InstanceView, ModelView, NodeView, Stage
from lambdascale.control.spec import Tier
from lambdascale.membership import MemberState
from lambdascale.sim.state import Inst, ModelRun, NodeState, SimState, prefill_tokens


class Views(SimState):
    """Snapshot building (the observe step of the controller pass, and dispatch's model view)."""

    def _inst_view(self, inst: Inst) -> InstanceView:
        """The instance's contract view, rebuilt only after it changed (``inst.view = None``)."""
        if inst.view is None:
            # what is left to compute and generate, as the core's view counts it (control.router.work_tokens):
            # a prefill (one token when the KV was shipped here) or a running sequence's next decode
            toks = (sum(work_tokens(max(1, prefill_tokens(r)), r.out - r.generated) for r in inst.pending)
                    + sum(work_tokens(prefill_tokens(r), r.out - r.generated) for r in inst.seg_new)
                    + sum(work_tokens(1, r.out - r.generated) for r in inst.running))
            inst.view = InstanceView(inst.id, inst.m.name, inst.state,
                                     tuple(Stage(n, a, b) for n, a, b in inst.stages),
                                     capacity=inst.capacity, outstanding_requests=inst.outstanding,
                                     outstanding_tokens=toks, step_slots=inst.slots)
        return inst.view

    def _model_view(self, m: ModelRun | None = None) -> ModelView:
        """The model's view (the first model's by default), rebuilt only when it changed."""
        m = m or self.models[0]
        now = self.loop.now()
        while m.recent and m.recent[0] < now - self.s.rate_window_s:
            m.recent.popleft()
        key = (m.version, len(m.held), len(m.recent), m.last_request_at, m.last_scale_at, m.svc_ewma)
        if m.view is not None and m.view_key == key:
            return m.view
        insts = tuple(self._inst_view(i) for i in m.insts.values())
        m.view = ModelView(
            name=m.name, spec=m.spec, size_bytes=m.model.nbytes, n_blocks=m.model.n_blocks,
            instances=insts, queue_len=len(m.held),
            in_flight=sum(i.outstanding for i in m.insts.values()),
            arrival_rate=len(m.recent) / self.s.rate_window_s, service_time_s=m.svc_ewma,
            last_request_at=m.last_request_at, last_scale_at=m.last_scale_at)
        m.view_key = key
        return m.view

    def _holdings(self, node: NodeState) -> tuple[Holding, ...]:
        out: list[Holding] = []
        for name, inst in node.insts.items():
            m = self.by_name[name]
            K, nb = m.model.n_chunks, m.model.nbytes
            chunks = node.chunks.get(name, set())
            last = node.gpu_last_used.get(name, 0.0)
            if len(chunks) == K:
                out.append(Holding(name, Tier.GPU, nb, last, pinned=node.source_busy.get(name, 0) > 0))
            else:
                held = int(sum(m.model.chunk_bytes[c] for c in chunks))
                out.append(Holding(name, Tier.GPU, held, last, blocks=m.model.blocks_held(chunks)))
        if len(node.chunks) > len(node.insts):  # device copies kept through a pause, no instance on them (sim/faults.py)
            for name, chunks in node.chunks.items():
                m = self.by_name[name]
                if name not in node.insts and len(chunks) == m.model.n_chunks:
                    out.append(Holding(name, Tier.GPU, m.model.nbytes, node.gpu_last_used.get(name, 0.0),
                                       pinned=node.source_busy.get(name, 0) > 0))
        # host and SSD holdings change far less often than GPU ones: rebuilt only when their inputs moved
        busy = tuple(sorted(k for k, v in node.source_busy.items() if v > 0))
        hkey = (tuple(node.host.items()), tuple(node.host_partial), busy)
        if node.host_cache[0] != hkey:
            hs = [Holding(name, Tier.HOST, self.by_name[name].model.nbytes, last,
                          pinned=node.source_busy.get(name, 0) > 0) for name, last in node.host.items()]
            hs += [Holding(name, Tier.HOST, self.by_name[name].model.nbytes, 0.0, blocks=frozenset())
                   for name in node.host_partial]
            node.host_cache = (hkey, tuple(hs))
        skey = (tuple(node.ssd), tuple(node.ssd_partial))
        if node.ssd_cache[0] != skey:
            ss = [Holding(name, Tier.SSD, self.by_name[name].model.nbytes, 0.0) for name in node.ssd]
            ss += [Holding(name, Tier.SSD, self.by_name[name].model.nbytes, 0.0, blocks=frozenset())
                   for name in node.ssd_partial]
            node.ssd_cache = (skey, tuple(ss))
        return tuple(out) + node.host_cache[1] + node.ssd_cache[1]

    def _node_view(self, n: NodeState) -> NodeView:
        if n.view is None or n.view_version != n.version:
            n.view = NodeView(
                id=n.id, gpus_total=n.gpus_total, gpus_free=n.gpus_free,
                host_bytes_total=n.host_total, host_bytes_free=max(0, n.host_total - n.host_used),
                ssd_bytes_total=n.ssd_total, ssd_bytes_free=max(0, n.ssd_total - n.ssd_used),
                holdings=self._holdings(n))
            n.view_version = n.version
        return n.view

    def _idle(self, m: ModelRun) -> bool:
        """Nothing to decide for ``m``: no instance, no queue, no arrival in the rate window, no
        floor. The autoscaler's decision for such a model is always "steady at 0", so the
        controller leaves it out of the snapshot it scales from (a pure shortcut)."""
        if m.insts or m.held or m.spec.floor:
            return False
        now = self.loop.now()
        while m.recent and m.recent[0] < now - self.s.rate_window_s:
            m.recent.popleft()
        return not m.recent

    def snapshot(self, only: ModelRun | None = None, active: bool = False) -> ClusterSnapshot:
        """Every alive node and every model (``only``: that model alone, for a scale-from-zero kick;
        ``active``: only models with something to decide, for the autoscaler and placement; the
        memory manager always gets every model, as an absent one would count as undeployed)."""
        models: Sequence[ModelRun] = ((only,) if only is not None
                                      else [m for m in self.models if not self._idle(m)] if active else self.models)
        # a suspect or dead node is in no snapshot: nothing is placed there, it is no source (sim/faults.py)
        return ClusterSnapshot(nodes=tuple(self._node_view(n) for n in self.nodes
                                           if self.member[n.id] is MemberState.ALIVE),
                               models=tuple(self._model_view(m) for m in models))
