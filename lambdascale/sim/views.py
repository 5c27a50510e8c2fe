"""The control plane's view of the simulated cluster: the :class:`ClusterSnapshot` every policy
(autoscaler, placement, memory manager, router) decides on, built from the simulation's state.

Views are cached: an instance's is rebuilt only after it changed (``inst.view = None``), a node's
only when the state it was built from (``_node_key``) differs, so a controller pass on a large
cluster costs little when little changed.
"""

from __future__ import annotations

from typing import Any

from lambdascale.control.router import work_tokens
from lambdascale.control.snapshot import ClusterSnapshot, Holding, InstanceView, ModelView, NodeView, Stage
from lambdascale.control.spec import Tier
from lambdascale.sim.state import Inst, NodeState, SimState, prefill_tokens


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
            inst.view = InstanceView(inst.id, self.model.name, inst.state,
                                     tuple(Stage(n, a, b) for n, a, b in inst.stages),
                                     capacity=inst.capacity, outstanding_requests=inst.outstanding,
                                     outstanding_tokens=toks, step_slots=inst.slots)
        return inst.view

    def _model_view(self) -> ModelView:
        now = self.loop.now()
        while self._recent and self._recent[0] < now - self.s.rate_window_s:
            self._recent.popleft()
        insts = tuple(self._inst_view(i) for i in self.insts.values())
        return ModelView(
            name=self.model.name, spec=self.spec, size_bytes=self.model.nbytes, n_blocks=self.model.n_blocks,
            instances=insts, queue_len=len(self.held),
            in_flight=sum(i.outstanding for i in self.insts.values()),
            arrival_rate=len(self._recent) / self.s.rate_window_s, service_time_s=self._svc_ewma,
            last_request_at=self.last_request_at, last_scale_at=self.last_scale_at)

    def _holdings(self, node: NodeState) -> tuple[Holding, ...]:
        m, nb, K = self.model.name, self.model.nbytes, self.model.n_chunks
        out: list[Holding] = []
        if node.inst is not None:
            if len(node.chunks) == K:
                out.append(Holding(m, Tier.GPU, nb, node.gpu_last_used, pinned=node.source_busy > 0))
            else:
                held = int(sum(self.model.chunk_bytes[c] for c in node.chunks))
                out.append(Holding(m, Tier.GPU, held, node.gpu_last_used, blocks=self.model.blocks_held(node.chunks)))
        if node.host:
            out.append(Holding(m, Tier.HOST, nb, node.host_last_used, pinned=node.source_busy > 0))
        elif node.host_partial:
            out.append(Holding(m, Tier.HOST, nb, node.host_last_used, blocks=frozenset()))
        if node.ssd or node.ssd_partial:
            out.append(Holding(m, Tier.SSD, nb, 0.0, blocks=None if node.ssd else frozenset()))
        return tuple(out)

    def _node_key(self, n: NodeState) -> tuple[Any, ...]:
        st = None if n.inst is None else n.inst.state
        return (st, len(n.chunks), n.host, n.host_partial, n.ssd, n.ssd_partial, n.source_busy > 0,
                n.gpus_free, n.host_last_used, n.gpu_last_used)

    def snapshot(self) -> ClusterSnapshot:
        nodes = []
        for n in self.nodes:
            key = self._node_key(n)
            if n.view is not None and n.view_key == key:
                nodes.append(n.view)
                continue
            hs = self._holdings(n)
            host_used = sum(h.nbytes for h in hs if h.tier is Tier.HOST)
            ssd_used = sum(h.nbytes for h in hs if h.tier is Tier.SSD)
            nodes.append(NodeView(
                id=n.id, gpus_total=n.gpus_total, gpus_free=0 if n.inst is not None else n.gpus_free,
                host_bytes_total=self.host_total[n.id], host_bytes_free=max(0, self.host_total[n.id] - host_used),
                ssd_bytes_total=self.ssd_bytes_total, ssd_bytes_free=max(0, self.ssd_bytes_total - ssd_used),
                holdings=hs))
            n.view, n.view_key = nodes[-1], key
        return ClusterSnapshot(nodes=tuple(nodes), models=(self._model_view(),))
