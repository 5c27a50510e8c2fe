"""How an execution pipeline serves: steps it keeps in flight, sequences it takes, and how its
requests' KV caches move when it dissolves.

Pure rules shared by the runtime (:mod:`lambdascale.runtime.pipeline`,
:mod:`lambdascale.runtime.kvmove`) and the simulator, so a simulated pipeline batches, overlaps
its steps and hands its requests on exactly as a real one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lambdascale.errors import LambdaScaleError

#: most steps a pipeline keeps in flight (``runtime.messages.FormStage.slots``' limit)
MAX_SLOTS = 64


def microbatch_slots(n_stages: int, microbatches: int) -> int:
    """Steps a pipeline of ``n_stages`` keeps in flight: ``microbatches``, or one per stage when 0
    (at most :data:`MAX_SLOTS`)."""
    if microbatches < 0:
        raise ValueError(f"microbatches must be >= 0 (0: one per stage), got {microbatches}")
    return min(MAX_SLOTS, max(1, microbatches or n_stages))


def pipeline_seqs(max_seqs: int, total_layers: int, widest_layers: int, n_stages: int,
                  rule: str = "kv") -> int:
    """Sequences a pipeline takes when a full instance takes ``max_seqs``.

    ``max_seqs`` is what one node's KV memory holds for the whole model. A stage running a
    fraction f of the layers keeps 1/f times as many sequences in the same memory, so with
    ``rule="kv"`` a pipeline takes ``floor(max_seqs / f)`` of its widest stage (two equal stages:
    twice a full instance). ``rule="instance"``, or a one-stage pipeline, takes ``max_seqs``.
    """
    if rule not in ("kv", "instance"):
        raise ValueError(f"pipeline batch rule must be 'kv' or 'instance', got {rule!r}")
    if rule == "instance" or n_stages <= 1:
        return max_seqs
    if not 0 < widest_layers <= total_layers:
        raise ValueError(f"widest stage must run 1..{total_layers} layers, got {widest_layers}")
    return max(max_seqs, max_seqs * total_layers // widest_layers)


class KvPolicy(str, Enum):
    """How dissolution moves KV: decide per request by cost, or always one way."""

    AUTO = "auto"
    SHIP = "ship"
    RECOMPUTE = "recompute"


class KvMove(str, Enum):
    SHIP = "ship"
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class KvMoveCost:
    """The two estimates for moving one request's ``tokens`` cached tokens, and the choice."""

    tokens: int
    kv_bytes: int
    ship_s: float
    recompute_s: float
    choice: KvMove


def choose_kv_move(
    tokens: int,
    kv_bytes: int,
    link_bytes_per_s: float,
    recompute_s: float,
    policy: KvPolicy | str = KvPolicy.AUTO,
    ship_overhead_s: float = 0.0,
) -> KvMoveCost:
    """Pure: ship when ``kv_bytes / link + overhead < recompute_s`` (ties recompute), unless forced.

    A request with nothing cached (``tokens == 0``) always "recomputes" (there is nothing to ship).
    """
    policy = KvPolicy(policy)
    if tokens < 0 or kv_bytes < 0:
        raise LambdaScaleError(f"KV move of {tokens} tokens / {kv_bytes} bytes: both must be >= 0")
    if not link_bytes_per_s > 0:
        raise LambdaScaleError(f"KV move: link rate must be > 0 bytes/s, got {link_bytes_per_s}")
    if recompute_s < 0 or ship_overhead_s < 0:
        raise LambdaScaleError(f"KV move: times must be >= 0 (recompute {recompute_s}, overhead {ship_overhead_s})")
    ship_s = kv_bytes / link_bytes_per_s + ship_overhead_s
    if tokens == 0 or policy is KvPolicy.RECOMPUTE:
        choice = KvMove.RECOMPUTE
    elif policy is KvPolicy.SHIP:
        choice = KvMove.SHIP
    else:
        choice = KvMove.SHIP if ship_s < recompute_s else KvMove.RECOMPUTE
    return KvMoveCost(tokens, kv_bytes, ship_s, recompute_s, choice)
