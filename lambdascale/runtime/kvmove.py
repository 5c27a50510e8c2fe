"""Moving a request's KV cache when its pipeline dissolves: ship it, or let the destination recompute.

DESIGN.md: "the destination recomputes the KV cache, or receives it when transfer is cheaper".
The choice is a pure function (:func:`~lambdascale.pipe.serving.choose_kv_move`, shared with the
simulator) of the request's cached tokens, the model
shape, the link rate and the destination's prefill rate:

* ship: ``kv_bytes / link_rate + overhead`` with ``kv_bytes = tokens x 2 x layers x kv_heads x
  head_dim x dtype bytes`` (K and V of every layer) and ``overhead`` the control round trips of
  one move (export, send, import);
* recompute: the time to prefill ``tokens`` tokens on the destination: the emulated device's cost
  model when one is set (the same :class:`~lambdascale.sim.costmodel.CostModel` the simulator
  uses), else the prefill rate the destination measured on its own recent steps, else a
  configured rate. In batch-invariant mode recompute is a replay (the prompt prefilled, each
  output already generated fed as one decode step), so those tokens cost a decode step each.

The shipping path (:func:`ship_kv`): every stage of the dissolving pipeline exports its layers'
KV of the moving sequences into a transport buffer (``ExportKv``), the buffers go to the
destination node over the data plane (``RegisterBuffer`` + ``SendBuffer``, skipped when a
stage already runs on the destination node), and the destination's full stage installs them
(``ImportKv``). The destination then continues with a decode step: no token is recomputed and,
since sampling is a pure function of the token state, the stream equals an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from lambdascale.errors import LambdaScaleError
from lambdascale.model.arch import ModelArch
from lambdascale.pipe.serving import KvMove, KvMoveCost, KvPolicy, choose_kv_move
from lambdascale.runtime.messages import ExportKv, ImportKv, RegisterBuffer, SendBuffer

if TYPE_CHECKING:
    from lambdascale.runtime.cluster import Cluster
    from lambdascale.runtime.pipeline import RemotePipeline
    from lambdascale.runtime.settings import RuntimeSettings


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(arch: ModelArch, dtype: str = "float32") -> int:
    """Bytes of K and V one token occupies over every layer of ``arch``."""
    if dtype not in _DTYPE_BYTES:
        raise LambdaScaleError(f"KV dtype {dtype!r} not one of {sorted(_DTYPE_BYTES)}")
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.dim_per_head * _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class RecomputeEstimate:
    """Recompute time on the destination: emulated device floor, else a measured or configured rate.

    ``cost`` is an optional :class:`~lambdascale.runtime.emulation.StepTimer` for the full model
    (the emulated step never lasts less than its floor, so the estimate is ``max(floor, rate)``).
    ``decode_step_s``: the destination's measured decode-step time, for batch-invariant replay
    (each replayed output is one decode step; without a measurement a step counts as one token).
    """

    tokens_per_s: float
    cost: object | None = None
    decode_step_s: float | None = None

    def seconds(self, tokens: int, replay: int = 0) -> float:
        """Time to rebuild ``tokens`` cached tokens, the last ``replay`` of them as single decode
        steps (batch-invariant mode replays outputs already generated; 0 = one prefill)."""
        if not 0 <= replay <= tokens:
            raise LambdaScaleError(f"replay of {replay} tokens must be within the {tokens} recomputed")
        pre = tokens - replay
        t = pre / self.tokens_per_s
        if self.cost is not None and (pre or not replay):
            t = max(t, self.cost.floor_s(pre, 0))  # type: ignore[attr-defined]
        step = self.decode_step_s if self.decode_step_s is not None else 1 / self.tokens_per_s
        if self.cost is not None:
            step = max(step, self.cost.floor_s(0, 1))  # type: ignore[attr-defined]
        return t + replay * step


@dataclass(frozen=True)
class KvMoveChooser:
    """Ship-or-recompute for the requests of dissolving pipelines, the same for every caller (the
    scale-out benchmark and the gateway): the model's KV bytes per token, the link, the policy, and
    how recompute is costed on a destination."""

    kv_per_token: int
    link_bytes_per_s: float
    policy: KvPolicy
    ship_overhead_s: float
    default_tokens_per_s: float  # recompute rate before a destination measured its own
    device_cost: object | None = None  # emulated full-model StepTimer, when agents emulate a device
    batch_invariant: bool = False  # recompute is then a replay: outputs fed back one decode step each

    @classmethod
    def build(cls, runtime: "RuntimeSettings", arch: ModelArch, dtype: str, link_gbps: float | None,
              emulate_device: str | None = None, batch_invariant: bool = False,
              policy: KvPolicy | str | None = None) -> "KvMoveChooser":
        """From ``runtime`` (``kv_move`` unless ``policy`` is given, ``kv_link_gbps`` when links are
        not capped, the recompute rate, the overhead) and the stages' ``dtype``."""
        cost = None
        if emulate_device:
            from lambdascale.runtime.emulation import StepTimer, parse_profile

            L = arch.num_hidden_layers
            cost = StepTimer.build(parse_profile(emulate_device), L, L)
        return cls(kv_bytes_per_token(arch, dtype), (link_gbps or runtime.kv_link_gbps) * 1e9 / 8,
                   KvPolicy(policy if policy is not None else runtime.kv_move), runtime.kv_ship_overhead_s,
                   runtime.kv_recompute_tokens_per_s, cost, batch_invariant)

    def choose(self, prompt_len: int, computed: int, dest_tokens_per_s: float | None = None,
               dest_decode_step_s: float | None = None) -> KvMoveCost:
        """For one request with ``computed`` cached tokens (``prompt_len`` of them its prompt),
        moving to a destination that measured ``dest_tokens_per_s`` prefill and
        ``dest_decode_step_s`` per decode step (None: not yet)."""
        replay = max(0, computed - prompt_len) if self.batch_invariant else 0
        est = RecomputeEstimate(dest_tokens_per_s or self.default_tokens_per_s, self.device_cost, dest_decode_step_s)
        return choose_kv_move(computed, computed * self.kv_per_token, self.link_bytes_per_s,
                              est.seconds(computed, replay), self.policy, self.ship_overhead_s)


_ids = itertools.count()


async def ship_kv(cluster: "Cluster", src: "RemotePipeline", dst: "RemotePipeline", seqs: Sequence[str]) -> int:
    """Move the KV of ``seqs`` from every stage of ``src`` into ``dst``'s single full stage.

    ``src``'s stages must still be formed (call before ``src.dissolve()``) and ``dst`` must not
    hold the sequences yet. Returns the bytes that crossed the network (parts exported on the
    destination node itself move no bytes). Raises the agents' errors (``AgentRequestError``,
    ``NodeLostError``); buffers left behind by a failed move are freed on the best-effort path.
    """
    if len(dst.placements) != 1:
        raise LambdaScaleError(f"KV can be shipped to a one-stage (full) instance; {dst.name} has {len(dst.placements)} stages")
    if not seqs:
        return 0
    target = dst.placements[0].node
    move = next(_ids)
    names = [f"kv/{dst.name}/{move}/{i}" for i in range(len(src.placements))]
    exports = await asyncio.gather(*(
        cluster.request(p.node, ExportKv(req=0, pipeline=src.name, index=i, seqs=list(seqs), buffer=names[i]))
        for i, p in enumerate(src.placements)
    ))
    lengths = exports[0]["lengths"]
    if any(e["lengths"] != lengths for e in exports):
        raise LambdaScaleError(f"stages of {src.name} disagree on cached lengths: {[e['lengths'] for e in exports]}")
    remote = [i for i, p in enumerate(src.placements) if p.node != target]
    moved = 0
    if remote:
        await asyncio.gather(*(cluster.request(target, RegisterBuffer(req=0, buffer=names[i], nbytes=max(1, exports[i]["nbytes"])))
                               for i in remote))
        await cluster.broadcast_peers()  # one-sided backends need the new buffers' keys
        sent = await asyncio.gather(*(cluster.request(src.placements[i].node, SendBuffer(req=0, buffer=names[i], dst=target))
                                      for i in remote))
        moved = sum(int(s["nbytes"]) for s in sent)
    await cluster.request(target, ImportKv(
        req=0, pipeline=dst.name, index=0, seqs=[(s, int(lengths[s])) for s in seqs],
        parts=[(names[i], int(e["layers"])) for i, e in enumerate(exports)], dtype=exports[0]["dtype"],
    ))
    return moved


# the pure choice lives in pipe.serving (shared with the simulator); callers may import it from here
__all__ = ["KvMove", "KvMoveChooser", "KvMoveCost", "KvPolicy", "RecomputeEstimate", "choose_kv_move",
           "kv_bytes_per_token", "ship_kv"]
