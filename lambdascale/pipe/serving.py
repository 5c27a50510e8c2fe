"""How an execution pipeline serves: whether a scale-out plans pipelines at all, which sources
lend them stages, steps a pipeline keeps in flight and how it splits its requests over them, the
sequences and step budget it takes, the slots full instances keep for its requests, and how its
requests' KV caches move when it dissolves (ship or recompute, and to which full instance).

Pure rules shared by the serving core (:mod:`lambdascale.core`), the runtime
(:mod:`lambdascale.runtime.pipeline`, :mod:`lambdascale.runtime.kvmove`) and the simulator, so a
simulated pipeline forms, batches, overlaps its steps and hands its requests on exactly as a real
one does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from lambdascale.errors import LambdaScaleError
from lambdascale.pipe.layout import ChunkLayout
from lambdascale.pipe.pipelines import PipelinePlanner

#: most steps a pipeline keeps in flight (``runtime.messages.FormStage.slots``' limit)
MAX_SLOTS = 64


def microbatch_slots(n_stages: int, microbatches: int) -> int:
    """Steps a pipeline of ``n_stages`` keeps in flight: ``microbatches``, or one per stage when 0
    (at most :data:`MAX_SLOTS`)."""
    if microbatches < 0:
        raise ValueError(f"microbatches must be >= 0 (0: one per stage), got {microbatches}")
    return min(MAX_SLOTS, max(1, microbatches or n_stages))


def microbatch_cap(waiting: int, parts: int) -> int:
    """Most requests the next micro-batch takes when ``parts`` micro-batches are about to start
    over ``waiting`` requests not in flight: ``ceil(waiting / parts)``, so the first ones take the
    extra request (5 over 2: 3 then 2). Started one after another, each with the requests and
    parts left, they split a burst as evenly as counts allow. The runtime's
    ``PipelineServer.plan_step`` cap; the simulator cuts its passes with it."""
    if waiting < 0 or parts < 1:
        raise ValueError(f"micro-batch cap needs waiting >= 0 and parts >= 1, got {waiting} and {parts}")
    return -(-waiting // parts)


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


def pipeline_step_tokens(max_step_tokens: int, max_seqs: int, seqs: int) -> int:
    """Token budget of one step of a unit taking ``seqs`` sequences where a full instance takes
    ``max_seqs`` with ``max_step_tokens``: the budget grows by the extra sequences (one decode
    token each), so the prefill room of a step (``max_step_tokens - max_seqs``, the
    batch-invariant chunk, ``engine.scheduler.prefill_chunk_size``) is the same wherever a
    request runs. A full instance (``seqs == max_seqs``) keeps ``max_step_tokens``."""
    if not 1 <= max_seqs <= seqs or max_step_tokens < 1:
        raise ValueError(f"step budget needs 1 <= max_seqs <= seqs and max_step_tokens >= 1, "
                         f"got max_seqs={max_seqs}, seqs={seqs}, max_step_tokens={max_step_tokens}")
    return max_step_tokens + (seqs - max_seqs)


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


def pipeline_planner(execute_while_load: bool, receivers: Sequence[int], n_blocks: int, n_chunks: int,
                     helpers: Mapping[int, int], layout: ChunkLayout | None = None) -> PipelinePlanner | None:
    """The execute-while-load planner of a multicast to ``receivers``, or None when no pipeline can
    form: execute-while-load off (the plan's and the deployment's switch together), or one
    receiver without a lending helper (it can only serve alone, once full). ``helpers`` as
    :func:`lending_helpers` gives them."""
    if not execute_while_load or not (len(receivers) > 1 or helpers):
        return None
    return PipelinePlanner(list(receivers), n_blocks, n_chunks, layout=layout, helpers=dict(helpers) or None)


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


def kept_slots(pipelines: Iterable[tuple[int, Collection[int]]], full_on: Mapping[int, str],
               policy: KvPolicy | str) -> dict[str, int]:
    """Slots of full instances kept away from the queue for live pipelines' requests.

    ``pipelines``: each live pipeline's requests (admitted, not finished) and its receivers (its
    stage nodes that are not lending helpers); ``full_on``: node -> id of the full instance
    serving there. When a pipeline dissolves its requests' KV can only ship to a full instance
    with a free slot (:func:`kv_destination`, the receivers' first), so while it runs each
    receiver's full instance keeps its share, ``ceil(requests / receivers)``. Helpers keep none:
    their instances serve the queue the whole time. With ``recompute`` nothing is kept: moved
    requests go to the queue's head. Returns instance id -> slots kept (ids keeping none left out).
    """
    if KvPolicy(policy) is KvPolicy.RECOMPUTE:
        return {}
    kept: dict[str, int] = {}
    for requests, receivers in pipelines:
        if requests < 0:
            raise ValueError(f"a pipeline holds >= 0 requests, got {requests}")
        if not requests or not receivers:
            continue
        share = -(-requests // len(receivers))
        for n in receivers:
            if n in full_on:
                kept[full_on[n]] = kept.get(full_on[n], 0) + share
    return kept
