"""The MLP of a decoder layer: gated dense (SwiGLU / GeGLU) or a mixture of experts.

A mixture-of-experts layer keeps its router and every expert's weights as stacked tensors
(``mlp.experts.gate_proj`` [E, I, h], ``up_proj`` [E, I, h], ``down_proj`` [E, h, I]) inside the
layer's execution block, so a stage holding the block runs the layer alone (no expert lives on
another node). Routing follows the reference (:class:`~lambdascale.model.arch.RouterKind`): a
softmax over all router logits in float32, the top k kept, renormalised when the family does.
Each expert runs on the rows routed to it (one matmul chain per expert hit, ascending order), and
its output, weighted by the token's routing probability, is summed into the token's row.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from lambdascale.model.arch import Activation, ModelArch

Linear = Callable[..., torch.Tensor]


def activation(act: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if act is Activation.GELU_TANH:
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


class DenseMLP:
    """``down(act(gate(x)) * up(x))``: weights [I, h], [I, h], [h, I]."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Activation) -> None:
        self.w_gate, self.w_up, self.w_down = gate, up, down
        self.act = activation(act)

    def __call__(self, h: torch.Tensor, lin: Linear) -> torch.Tensor:
        return lin(self.act(lin(h, self.w_gate)) * lin(h, self.w_up), self.w_down)


class MoEMLP:
    """Top-k routed experts plus, where the family has one, a shared expert gated by a sigmoid."""

    def __init__(self, arch: ModelArch, t: Mapping[str, torch.Tensor], prefix: str) -> None:
        moe = arch.moe
        assert moe is not None  # built only for an MoE layer
        self.top_k = moe.top_k
        self.norm_topk = moe.norm_topk_prob
        self.router = t[prefix + "mlp.gate.weight"]  # [E, h]
        self.w_gate = t[prefix + "mlp.experts.gate_proj"]  # [E, I, h]
        self.w_up = t[prefix + "mlp.experts.up_proj"]  # [E, I, h]
        self.w_down = t[prefix + "mlp.experts.down_proj"]  # [E, h, I]
        self.act = activation(arch.hidden_act)
        self.shared: DenseMLP | None = None
        self.shared_gate: torch.Tensor | None = None
        if moe.shared_expert_intermediate_size:
            s = prefix + "mlp.shared_expert."
            self.shared = DenseMLP(t[s + "gate_proj.weight"], t[s + "up_proj.weight"], t[s + "down_proj.weight"],
                                   arch.hidden_act)
            self.shared_gate = t[prefix + "mlp.shared_expert_gate.weight"]  # [1, h]

    def route(self, h: torch.Tensor, lin: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, hidden] -> (weights [N, k] in h's dtype, expert ids [N, k] int64)."""
        probs = torch.softmax(lin(h, self.router), dim=-1, dtype=torch.float32)  # [N, E]
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return top_p.to(h.dtype), top_i

    def __call__(self, h: torch.Tensor, lin: Linear) -> torch.Tensor:
        weights, experts = self.route(h, lin)
        out = torch.zeros_like(h)
        for e in torch.unique(experts).tolist():  # ascending expert ids
            rows, slot = torch.where(experts == e)  # tokens routed to e, and at which of their k
            x = h[rows]
            y = lin(self.act(lin(x, self.w_gate[e])) * lin(x, self.w_up[e]), self.w_down[e])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        if self.shared is not None:
            assert self.shared_gate is not None
            out = out + torch.sigmoid(lin(h, self.shared_gate)) * self.shared(h, lin)
        return out
