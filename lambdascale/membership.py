"""Cluster membership rules, pure: a node's state from its silence, the restart backoff of a
supervised agent, and what a node still holds when it returns.

The runtime's controller (:mod:`lambdascale.runtime.cluster`), the embedded launcher's supervisor
(:mod:`lambdascale.runtime.local_launcher`) and the simulator's fault model
(:mod:`lambdascale.sim.faults`) all apply these functions, so a policy tried in the simulator sees
nodes leave and return as the running system does. The rules and where they come from are in
docs/arch/runtime.md ("Membership").
"""

from __future__ import annotations

from enum import Enum


class MemberState(str, Enum):
    """Where a node stands in the controller's view.

    * ``alive``: heartbeats arrive; the node takes new work.
    * ``suspect``: it missed heartbeats; what it runs keeps running, nothing new is placed on it
      and it is no multicast source. A heartbeat brings it back to alive (it refutes the suspicion).
    * ``dead``: silent past the limit, or its control channel closed; everything it ran is moved
      and everything its incarnation sends from now on is fenced off.
    * ``rejoining``: a new incarnation registered; it becomes alive once its report of what it
      holds is in and every peer knows its address.
    """

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    REJOINING = "rejoining"


class FaultKind(str, Enum):
    """How a node leaves: a ``pause`` (a stopped process, a GC pause, a network blip: its memory
    survives) or a ``crash`` (a killed process, an OOM kill: its memory is gone, its disk is not)."""

    PAUSE = "pause"
    CRASH = "crash"


def suspect_after_s(heartbeat_s: float, misses: int) -> float:
    """Silence after which a node is suspect: half the misses that declare it dead (at least one
    period), as memberlist suspects a member before it declares it failed."""
    return heartbeat_s * max(1, misses // 2)


def dead_after_s(heartbeat_s: float, misses: int) -> float:
    """Silence after which a node is dead: ``runtime.heartbeat_misses`` periods."""
    return heartbeat_s * misses


def state_for_silence(silence_s: float, heartbeat_s: float, misses: int) -> MemberState:
    """The state of a registered node whose last message is ``silence_s`` old."""
    if silence_s > dead_after_s(heartbeat_s, misses):
        return MemberState.DEAD
    if silence_s > suspect_after_s(heartbeat_s, misses):
        return MemberState.SUSPECT
    return MemberState.ALIVE


def next_incarnation(highest_given: int, claimed: int) -> int:
    """The incarnation a registration gets: above every one this node had (the controller's
    record, and the one the agent says it last held), so it only ever grows."""
    return max(highest_given, claimed) + 1


def respawn_delay_s(failures: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff before restarting an agent that died ``failures`` times in a
    row (1 = its first death): ``base_s``, doubling, at most ``cap_s``."""
    if failures < 1:
        return 0.0
    return min(cap_s, base_s * 2 ** min(failures - 1, 62))


def tiers_kept(kind: FaultKind) -> frozenset[str]:
    """Tiers whose copies a node still has when it returns: a paused process keeps its memory
    (device and host copies as they stand), a crashed one keeps only its SSD files (verified
    against their checksums before it reports them)."""
    if kind is FaultKind.PAUSE:
        return frozenset({"gpu", "host", "ssd"})
    return frozenset({"ssd"})
