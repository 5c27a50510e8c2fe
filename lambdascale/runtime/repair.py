"""Re-planning a multicast after a fault: a pure function of who holds what.

When a node dies mid-multicast, the original schedule is void (chunks it was to forward never
come). :func:`plan_repair` builds a fresh schedule among the survivors from their *current*
holdings: round by round, each target that misses something receives, from a distinct idle
holder, the rarest chunk it misses (rarest first spreads chunks that only one node has before
that node becomes the bottleneck). Every node sends and receives at most one chunk per round,
the same link model as the planners in :mod:`lambdascale.pipe`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from lambdascale.errors import TransferError


class ChunkLostError(TransferError):
    """Some chunk is held by no surviving node: the model cannot be completed from this cluster."""


def plan_repair(
    holdings: Mapping[int, set[int]], targets: Sequence[int], n_chunks: int
) -> list[list[tuple[int, int, int]]]:
    """Rounds of ``(src, dst, chunk)`` that give every target every chunk in ``range(n_chunks)``.

    ``holdings`` maps every *surviving* node to the chunks it holds (verified). Deterministic:
    ties go to the lowest chunk index, then the lowest holder id. Raises :class:`ChunkLostError`
    naming the chunks no survivor holds.
    """
    have = {n: set(h) for n, h in holdings.items()}
    for t in targets:
        if t not in have:
            raise ValueError(f"target node {t} is not among the surviving nodes {sorted(have)}")
    everything = set(range(n_chunks))
    held_anywhere = set().union(*have.values()) if have else set()
    lost = sorted(everything - held_anywhere) if any(everything - have[t] for t in targets) else []
    if lost:
        raise ChunkLostError(
            f"chunks {lost} are held by no surviving node ({sorted(have)}); the multicast cannot complete"
        )
    rounds: list[list[tuple[int, int, int]]] = []
    while True:
        needy = [t for t in sorted(targets) if everything - have[t]]
        if not needy:
            return rounds
        holders_of = {c: sorted(n for n, h in have.items() if c in h) for c in everything}
        busy_src: set[int] = set()
        rnd: list[tuple[int, int, int]] = []
        for dst in needy:
            missing = sorted(everything - have[dst], key=lambda c: (len(holders_of[c]), c))
            for c in missing:
                src = next((h for h in holders_of[c] if h != dst and h not in busy_src), None)
                if src is not None:
                    busy_src.add(src)
                    rnd.append((src, dst, c))
                    break
        assert rnd, "a round with needy targets always assigns at least one send"
        for src, dst, c in rnd:
            have[dst].add(c)
        rounds.append(rnd)
