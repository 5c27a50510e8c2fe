"""Per-group multicast schedules, one function per algorithm (:class:`Algo`): rounds of
``(src_local, dst_local, position)`` over local nodes ``0..n-1`` (0 = the group's source) and
chunk positions ``0..k-1``. :func:`lambdascale.pipe.multicast.plan_multicast` maps local nodes to
the group's receivers and positions to the source's chunk order.
"""

from __future__ import annotations

from lambdascale.pipe.multicast_plan import Algo

Local = list[list[tuple[int, int, int]]]  # rounds of (src_local, dst_local, position)


def _binomial_group(n: int, k: int) -> Local:
    """Binomial pipeline over local nodes 0..n-1 (0 = source) for chunk positions 0..k-1."""
    rounds: Local = []
    if n <= 1:
        return rounds
    l = n.bit_length() - 1  # floor(log2 n) >= 1
    H = 1 << l
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    # team partner of hypercube node x (x >= 1) for the extras H..n-1
    mate = [-1] * H
    for j, e in enumerate(range(H, n)):
        mate[j + 1] = e

    def team_union(x: int) -> int:
        e = mate[x]
        return holds[x] | (holds[e] if e >= 0 else 0)

    done_needed = n - 1
    t = 0
    limit = 4 * (k + n) + 16
    while True:
        if sum(1 for i in range(1, n) if holds[i] == full) == done_needed:
            break
        if t > limit:  # pragma: no cover - would be a planner bug
            raise RuntimeError(f"binomial schedule did not converge (n={n}, k={k})")
        d = 1 << (t % l)
        # Choose each team's external sender: the member holding the highest chunk the peer team
        # lacks (ties: alternate by round parity). The other member receives from outside and
        # forwards inside to the sender, so each member sends once and receives once.
        sender = list(range(H))
        for x in range(1, H):
            e = mate[x]
            if e < 0:
                continue
            peer_has = team_union(x ^ d)
            bx = (holds[x] & ~peer_has).bit_length()
            be = (holds[e] & ~peer_has).bit_length()
            # When the peer needs nothing from the team, the hypercube member keeps receiving from
            # outside (the mate mirrors it), which gets whole blocks onto one node sooner.
            if be > bx or (be == bx and (be == 0 or t % 2 == 1)):
                sender[x] = e
        sends: list[tuple[int, int, int]] = []
        for x in range(H):
            y = x ^ d
            snd = sender[x]
            recv = y if mate[y] < 0 else (mate[y] if sender[y] == y else y)
            if snd == 0:
                if t < k:
                    pos = t
                else:
                    pos = (full & ~team_union(y)).bit_length() - 1
                    if pos < 0:
                        pos = (full & ~holds[recv]).bit_length() - 1
            else:
                h = holds[snd]
                lack = h & ~team_union(y)
                if not lack:
                    lack = h & ~holds[recv]
                pos = lack.bit_length() - 1
            if pos >= 0 and not (holds[recv] >> pos) & 1:
                sends.append((snd, recv, pos))
        for x in range(1, H):
            e = mate[x]
            if e >= 0:
                a = e if sender[x] == x else x
                b = sender[x]
                lack = holds[a] & ~holds[b]
                if lack:
                    sends.append((a, b, lack.bit_length() - 1))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
        t += 1
    return rounds


def _faasnet_group(n: int, k: int) -> Local:
    """Binary tree (heap indices, 0 = source), lowest missing chunk first, one send per round."""
    rounds: Local = []
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    turn = [0] * n
    while any(h != full for h in holds):
        sends = []
        for i in range(n):
            kids = [c for c in (2 * i + 1, 2 * i + 2) if c < n]
            cands = [(c, holds[i] & ~holds[c]) for c in kids]
            cands = [(c, m) for c, m in cands if m]
            if not cands:
                continue
            if len(cands) == 2:
                c, m = cands[turn[i] % 2]
                turn[i] += 1
            else:
                c, m = cands[0]
            pos = (m & -m).bit_length() - 1
            sends.append((i, c, pos))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
    return rounds


def _ring_group(n: int, k: int) -> Local:
    """Chain 0 -> 1 -> ... -> n-1; each node forwards its lowest missing-at-next chunk."""
    rounds: Local = []
    full = (1 << k) - 1
    holds = [0] * n
    holds[0] = full
    while any(h != full for h in holds):
        sends = []
        for i in range(n - 1):
            m = holds[i] & ~holds[i + 1]
            if m:
                sends.append((i, i + 1, (m & -m).bit_length() - 1))
        for s, r, p in sends:
            holds[r] |= 1 << p
        rounds.append(sends)
    return rounds


def _direct_group(n: int, k: int) -> Local:
    """The source sends chunk-major: position 0 to every receiver, then position 1, ..."""
    return [[(0, 1 + (t % (n - 1)), t // (n - 1))] for t in range(k * (n - 1))] if n > 1 else []


GROUP_SCHEDULERS = {
    Algo.BINOMIAL: _binomial_group,
    Algo.FAASNET: _faasnet_group,
    Algo.RING: _ring_group,
    Algo.DIRECT: _direct_group,
}
