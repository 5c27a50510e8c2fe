"""How an execution pipeline serves: steps it keeps in flight and sequences it takes.

Pure rules shared by the runtime (:mod:`lambdascale.runtime.pipeline`) and the simulator, so a
simulated pipeline batches and overlaps its steps exactly as a real one does.
"""

from __future__ import annotations

from typing import Literal

#: most steps a pipeline keeps in flight (``runtime.messages.FormStage.slots``' limit)
MAX_SLOTS = 64

PipelineBatchRule = Literal["kv", "instance"]


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
