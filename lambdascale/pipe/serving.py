"""How an execution pipeline serves: which sources lend it stages, steps it keeps in flight,
sequences it takes, and how its requests' KV caches move when it dissolves (ship or recompute,
and to which full instance).

Pure rules shared by the runtime (:mod:`lambdascale.runtime.pipeline`,
:mod:`lambdascale.runtime.kvmove`) and the simulator, so a simulated pipeline batches, overlaps
its steps and hands its requests on exactly as a real one does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
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


def pipeline_seqs_for(max_seqs: int, stages: Sequence[tuple[int, int]], total_layers: int,
                      rule: str = "kv") -> int:
    """:func:`pipeline_seqs` of a pipeline whose stages run the layer ranges ``stages``
    (``(start, end)`` each, in order): the widest stage decides. Blocks may stand for layers
    (the simulator's unit) as long as ``total_layers`` counts the same unit."""
    if not stages:
        raise ValueError("a pipeline has at least one stage")
    widest = max(end - start for start, end in stages)
    return pipeline_seqs(max_seqs, total_layers, widest, len(stages), rule)


def lending_helpers(sources: Iterable[int], serving: Collection[int], blocks: int) -> dict[int, int]:
    """Sources that may run stages of a scale-out's execute-while-load pipelines, each up to
    ``blocks`` blocks (``runtime.pipeline_helper_blocks`` / ``sim.pipeline_helper_blocks``): the
    sources serving the model alone (``serving``: nodes with a full instance of it), in
    ``sources``' order; none when ``blocks`` is 0. The planner's ``helpers`` argument."""
    if blocks < 0:
        raise ValueError(f"helper blocks must be >= 0, got {blocks}")
    if not blocks:
        return {}
    return {s: blocks for s in sources if s in serving}


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


@dataclass(frozen=True)
class KvTarget:
    """A full instance that could take a dissolving pipeline's request with its KV cache.

    ``outstanding``: requests it holds or was promised (caches on their way included);
    ``free_slots``: sequences it can still take; ``kv_free``: KV memory left, in the unit the
    request's need is given in (tokens in the simulator)."""

    id: str
    node: int
    outstanding: int
    free_slots: int
    kv_free: int


def kv_destination(targets: Iterable[KvTarget], kv_need: int, receivers: Collection[int]) -> KvTarget | None:
    """Where a dissolving pipeline ships one request's KV cache: a full instance with a free slot
    and room for ``kv_need``; first one on a node of the pipeline's ``receivers`` (its stage nodes
    that are not lending helpers: the gateway keeps slots there for the pipeline's requests),
    then the least outstanding, then the lowest id. None: no instance fits (recompute)."""
    fits = [t for t in targets if t.free_slots > 0 and kv_need <= t.kv_free]
    if not fits:
        return None
    return min(fits, key=lambda t: (t.node not in receivers, t.outstanding, t.id))
