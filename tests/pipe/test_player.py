"""Schedule player: hand-computed times, chunk-level never later than round-synchronous."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdascale.pipe import Algo, Links, PlanError, play, plan_multicast


def test_round_mode_by_hand() -> None:
    # 4 nodes, 2 chunks of 100 B at 100 B/s, latency 0.5 s: every transfer takes 1.5 s and the
    # plan has 3 rounds (see test_multicast), so rounds end at 1.5, 3.0, 4.5 s.
    p = plan_multicast("binomial", 4, 1, 2, 2)
    links = Links(nic_send_bps=100, nic_recv_bps=100, latency_s=0.5)
    r = play(p, 100, links, "round")
    assert r.chunk_arrival[1] == (1.5, 4.5)
    assert r.chunk_arrival[2] == (4.5, 3.0)
    assert r.chunk_arrival[3] == (3.0, 4.5)
    assert r.block_arrival[2] == (4.5, 3.0)
    assert r.node_full == {1: 4.5, 2: 4.5, 3: 4.5}
    assert r.completion_time == 4.5
    assert r.all_blocks_time == 3.0  # block 0 on node 3 at 3.0, block 1 on node 2 at 3.0
    assert r.first_pipeline_time == 3.0  # nodes 2 and 3 form a 2-stage pipeline


def test_chunk_mode_by_hand_overlaps_latency() -> None:
    # Same plan, chunk mode: the source's NIC is busy 1 s per chunk (latency overlaps), so
    # 0->1 c0 lands at 1.5; 0->2 c1 starts at 1.0 and lands at 2.5; 1->3 c0 starts at 1.5,
    # lands at 3.0; 0->1 c1 starts at 2.0, lands 3.5; 2->3 c1 starts 2.5 (3's NIC free at 2.5),
    # lands 4.0; 3->2 c0 starts 3.0, lands 4.5.
    p = plan_multicast("binomial", 4, 1, 2, 2)
    links = Links(nic_send_bps=100, nic_recv_bps=100, latency_s=0.5)
    r = play(p, 100, links, "chunk")
    assert r.chunk_arrival[1] == (1.5, 3.5)
    assert r.chunk_arrival[2] == (4.5, 2.5)
    assert r.chunk_arrival[3] == (3.0, 4.0)
    assert r.completion_time == 4.5


def test_slow_receiver_nic_and_per_chunk_sizes() -> None:
    p = plan_multicast("direct", 3, 1, 2, 2)
    links = Links(nic_send_bps=100, nic_recv_bps=100, latency_s=0.0, recv_override={2: 50})
    r = play(p, [100, 200], links, "round")
    # rounds: 0->1 c0 (1 s), 0->2 c0 (2 s), 0->1 c1 (2 s), 0->2 c1 (4 s)
    assert r.chunk_arrival[1] == (1.0, 5.0)
    assert r.chunk_arrival[2] == (3.0, 9.0)


def test_intra_node_fan_out_uses_intra_bandwidth() -> None:
    p = plan_multicast("binomial", 2, 1, 1, 1, gpus_per_node=2)
    links = Links(nic_send_bps=10, nic_recv_bps=10, latency_s=0, intra_bps=100, intra_latency_s=0)
    r = play(p, 100, links, "chunk")
    assert r.chunk_arrival[2] == (10.0,)
    assert r.chunk_arrival[3] == (11.0,)
    assert r.node_full == {1: 11.0}


def test_nic_per_gpu_doubles_network_throughput() -> None:
    # 2 lanes of 2 chunks each on 100 B/s NICs: both NICs work in parallel, so chunk 3 lands at
    # 2 s on GPU 3 (vs 4 s for one NIC) and reaches GPU 2 over the intra link 0.1 s later.
    links = Links(nic_send_bps=100, nic_recv_bps=100, latency_s=0, intra_bps=1000, intra_latency_s=0)
    two = play(plan_multicast("binomial", 2, 1, 2, 4, gpus_per_node=2, nics_per_node=2), 100, links, "chunk")
    one = play(plan_multicast("binomial", 2, 1, 2, 4, gpus_per_node=2), 100, links, "chunk")
    assert two.chunk_arrival[3][3] == 2.0 and two.chunk_arrival[2][3] == 2.1
    assert two.completion_time == 2.1 and one.completion_time == 4.1


def test_bad_player_inputs_name_the_field() -> None:
    p = plan_multicast("binomial", 2, 1, 1, 2)
    with pytest.raises(PlanError, match="chunk_bytes has 3 entries"):
        play(p, [1, 2, 3])
    with pytest.raises(PlanError, match="nic_send_bps"):
        Links(nic_send_bps=0)
    with pytest.raises(PlanError, match=r"recv_override\[4\]"):
        Links(recv_override={4: -1.0})
    with pytest.raises(PlanError, match="play mode"):
        play(p, 10, mode="eager")


def test_no_receivers_gives_no_pipeline() -> None:
    r = play(plan_multicast("binomial", 2, 2, 1, 1), 10)
    assert r.first_pipeline_time == math.inf and r.completion_time == 0.0


@settings(max_examples=60, deadline=None)
@given(
    algo=st.sampled_from(list(Algo)), n=st.integers(2, 20), s=st.integers(1, 3), k=st.integers(1, 16),
    g=st.sampled_from([1, 2]), lat=st.floats(0, 1e-3), slow=st.integers(0, 19),
)
def test_chunk_mode_is_never_later_than_round_mode(algo, n, s, k, g, lat, slow) -> None:
    s = min(s, n)
    p = plan_multicast(algo, n, s, 1, k, gpus_per_node=g)
    links = Links(nic_send_bps=1e9, nic_recv_bps=1e9, latency_s=lat, send_override={slow: 2.5e8})
    rr = play(p, 1e6, links, "round")
    rc = play(p, 1e6, links, "chunk")
    for e in p.receivers:
        assert all(c <= r + 1e-12 for c, r in zip(rc.chunk_arrival[e], rr.chunk_arrival[e]))
        assert all(math.isfinite(x) for x in rr.chunk_arrival[e])
    assert rc.completion_time <= rr.completion_time + 1e-12
    assert rc.first_pipeline_time <= rr.first_pipeline_time + 1e-12
