"""Token bucket, pool allocator and eviction policy: unit and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.clock import ManualClock
from lambdascale.store.cache import CacheEntry, CacheState, choose_evictions, eviction_order
from lambdascale.store.pool import PoolFullError, RangeAllocator
from lambdascale.ratelimit import BucketState, TokenBucket, take


# ---- token bucket ---------------------------------------------------------------------------

def test_bucket_waits_are_exact_with_a_manual_clock() -> None:
    clock = ManualClock()
    b = TokenBucket(rate=100.0, burst=50.0, clock=clock)
    assert b.reserve(50) == 0.0            # the burst is free
    assert b.reserve(100) == pytest.approx(1.0)   # then debt: 100 tokens at 100/s
    clock.advance(1.0)
    assert b.reserve(100) == pytest.approx(1.0)   # still 100 behind after paying the first
    clock.advance(10.0)
    assert b.reserve(10) == 0.0            # refilled, capped at burst


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 1000)), min_size=1, max_size=50))
def test_bucket_never_exceeds_rate_plus_burst(ops: list[tuple[float, int]]) -> None:
    rate, burst = 500.0, 200.0
    state = BucketState(burst, 0.0)
    now = 0.0
    taken = 0
    last_ready = 0.0
    for dt, n in ops:
        now += dt
        state, wait = take(state, rate, burst, now, n)
        taken += n
        last_ready = max(last_ready, now + wait)
        # bytes usable by time (now + wait) never exceed burst + rate * elapsed
        assert taken <= burst + rate * (now + wait) + 1e-6


def test_bucket_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="negative"):
        take(BucketState(0, 0), 1.0, 1.0, 0.0, -1)


# ---- pool allocator ------------------------------------------------------------------------

def test_allocator_first_fit_and_coalescing() -> None:
    a = RangeAllocator(16 * 4096, align=4096)
    x, y, z = a.alloc(4096), a.alloc(5000), a.alloc(1)
    assert (x.offset, y.offset, z.offset) == (0, 4096, 3 * 4096) and y.size == 8192
    a.free(y)
    w = a.alloc(4096)
    assert w.offset == 4096  # first fit reuses the hole
    a.free(x), a.free(w), a.free(z)
    a.check()
    assert a.free_bytes == a.capacity and a.largest_free == a.capacity
    with pytest.raises(ValueError, match="double free"):
        a.free(x)
    with pytest.raises(PoolFullError, match=r"cannot fit 70000 bytes: 65536 free of 65536"):
        a.alloc(70000)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40_000), st.integers(0, 1000)), max_size=80))
def test_allocator_never_overcommits(ops: list[tuple[bool, int, int]]) -> None:
    a = RangeAllocator(100_000, align=64)
    live = []
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            try:
                live.append(a.alloc(n))
            except PoolFullError:
                assert a.largest_free < a.rounded(n)  # refused only when no range fits
        else:
            a.free(live.pop(pick % len(live)))
        a.check()
        assert a.used == sum(x.size for x in live) <= a.capacity
        spans = sorted((x.offset, x.offset + x.size) for x in live)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))


# ---- eviction policy ------------------------------------------------------------------------

def test_eviction_prefers_expired_lru_and_spares_leased() -> None:
    es = [
        CacheEntry("a", 10, last_used=0.0, keep_alive_s=100.0),            # alive
        CacheEntry("b", 10, last_used=5.0, keep_alive_s=1.0),              # expired
        CacheEntry("c", 10, last_used=1.0, keep_alive_s=1.0, leases=1),    # expired but in use
        CacheEntry("d", 10, last_used=2.0, keep_alive_s=1.0),              # expired, older than b
    ]
    assert [e.key for e in eviction_order(es, now=10.0)] == ["d", "b", "a"]
    assert choose_evictions(es, need_bytes=15, free_bytes=0, now=10.0).evict == ("d", "b")
    assert choose_evictions(es, need_bytes=15, free_bytes=0, now=10.0, strict_keep_alive=True).evict == ("d", "b")
    assert choose_evictions(es, need_bytes=25, free_bytes=0, now=10.0).evict == ("d", "b", "a")
    strict = choose_evictions(es, need_bytes=25, free_bytes=0, now=10.0, strict_keep_alive=True)
    assert not strict.feasible and strict.evict == ()
    assert choose_evictions(es, need_bytes=45, free_bytes=0, now=10.0) .feasible is False
    assert choose_evictions(es, need_bytes=5, free_bytes=5, now=10.0).evict == ()


entries_st = st.lists(
    st.builds(CacheEntry, key=st.text("abcdefgh", min_size=1, max_size=3), nbytes=st.integers(1, 100),
              last_used=st.floats(0, 100), keep_alive_s=st.floats(0, 50), leases=st.integers(0, 2)),
    max_size=12, unique_by=lambda e: e.key,
)


@given(entries_st, st.integers(0, 600), st.integers(0, 100), st.floats(0, 200), st.booleans())
def test_choose_evictions_properties(entries: list[CacheEntry], need: int, free: int, now: float, strict: bool) -> None:
    d = choose_evictions(entries, need, free, now, strict)
    by_key = {e.key: e for e in entries}
    candidates = [e for e in entries if e.leases == 0 and (not strict or e.expired(now))]
    assert d.feasible == (free + sum(e.nbytes for e in candidates) >= need)
    assert all(by_key[k].leases == 0 for k in d.evict)                 # never a model in use
    if strict:
        assert all(by_key[k].expired(now) for k in d.evict)
    if d.feasible:
        assert free + sum(by_key[k].nbytes for k in d.evict) >= need
        if d.evict:  # minimal prefix: without the last one it would not fit
            assert free + sum(by_key[k].nbytes for k in d.evict[:-1]) < need
    else:
        assert d.evict == ()


def test_cache_state_leases() -> None:
    c = CacheState(default_keep_alive_s=5.0)
    c.add("m", 10, now=0.0)
    c.lease("m", now=1.0)
    with pytest.raises(ValueError, match="never evicted"):
        c.remove("m")
    c.release("m", now=2.0)
    assert c.get("m").last_used == 2.0 and c.get("m").leases == 0
    with pytest.raises(ValueError, match="no lease"):
        c.release("m", now=3.0)
    c.remove("m")
    assert "m" not in c
