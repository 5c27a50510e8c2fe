"""Execute-while-load through the gateway: a burst scales a model out by multicast from two holders
to two receivers; the λPipe planner forms a pipeline across the receivers before either holds the
whole model, dissolves it when they do, and every client still gets exactly a single-engine run's
text. With holders lending their devices, a 1 -> 2 scale-out pipelines too."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.schemas import DeploySpec
from tests.serve.cluster_helpers import SLOW_LINKS, burst, cluster_gateway, greedy_ids, wait_status

PROMPT = [1, 5, 9, 13]
N_TOKENS = 150
BODY = {"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}


def _formed(backend: ClusterBackend) -> list[tuple[int, ...]]:
    """The nodes of every pipeline the gateway's serving core formed, in order."""
    assert backend.core is not None
    return [u.nodes for u in backend.core.units_seen if u.pipelined]


@pytest.mark.parametrize("kv_move,lend", [("ship", 0), ("recompute", 0), ("auto", 2)])
def test_burst_scales_out_through_a_pipeline_and_outputs_stay_exact(tmp_path: Path, caplog, kv_move: str,
                                                                     lend: int) -> None:
    """On dissolution the requests' KV goes to the new full instances where they have free slots
    (ship) or the requests re-prefill from their token state (recompute): either way every text
    equals a single engine's. (How many ship here depends on timing; tests/serve/
    test_cluster_kv_ship.py checks the ship path deterministically.) With ``lend`` blocks per
    source (``runtime.pipeline_helper_blocks``) the first pipeline runs a stage on a holder."""
    caplog.set_level(logging.INFO, logger="lambdascale.core")
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
    name = ck.dir.name
    want_ids = greedy_ids(ck.dir, PROMPT, N_TOKENS)
    # Two full instances (two holders), then a burst at target concurrency 1 asks for four. The 2 s
    # tick lets the whole burst queue before the decision, so one scale-out takes both receivers.
    overrides = {"runtime.nodes": 4, "control.autoscale_interval_s": 2.0, "runtime.kv_move": kv_move,
                 "runtime.pipeline_helper_blocks": lend, **SLOW_LINKS}
    spec = DeploySpec(name=name, min_instances=2, max_instances=4, target_concurrency=1)
    with cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
        want = backend.codec(name).decode(want_ids)
        responses = burst(server.url, [{"model": name, **BODY}] * 8)

        def scale_out_done(st: dict) -> bool:
            return (backend.core.scale_outs_in_progress == 0
                    and any(len(t["targets"]) == 2 and 0 not in t["targets"] and len(t["node_full_at"]) == 2
                            for t in st["scale_timelines"])
                    and not any(i["state"] == "pipelined" for i in st["instances"]))

        st = wait_status(server.url, scale_out_done)  # the multicast may outlive the burst on the slow link
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["choices"][0]["text"] == want for r in responses)
    tl = next(t for t in st["scale_timelines"] if len(t["targets"]) == 2 and t["first_chunk_at"] is not None
              and 0 not in t["targets"])
    assert set(tl["node_full_at"]) == {str(n) for n in tl["targets"]}
    assert backend.core.stats.pipelines_formed >= 1, ("no pipeline formed across the receivers",
                                           [r.getMessage() for r in caplog.records])
    assert backend.core.stats.pipelines_dissolved == backend.core.stats.pipelines_formed
    if kv_move == "recompute":
        assert backend.core.stats.kv_moves["shipped"] == 0 and backend.core.stats.kv_bytes_shipped == 0
    formed = _formed(backend)
    on_holders = [nodes for nodes in formed if set(nodes) - set(tl["targets"])]
    if lend:
        assert on_holders and on_holders[0] == formed[0], f"the first pipeline ran on receivers only: {formed}"
    else:
        assert not on_holders, formed
    assert not [i for i in st["instances"] if i["state"] == "pipelined"]


def test_a_one_to_two_scale_out_serves_through_the_receiver_and_a_lending_holder(tmp_path: Path, caplog) -> None:
    """One holder, one receiver: receivers alone never form a pipeline, but with the holder lending
    its device (``runtime.pipeline_helper_blocks``) the receiver runs the blocks it already holds
    and the holder the rest, before the receiver is full; texts stay exact."""
    caplog.set_level(logging.INFO, logger="lambdascale.core")
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
    name = ck.dir.name
    want_ids = greedy_ids(ck.dir, PROMPT, N_TOKENS)
    overrides = {"runtime.nodes": 2, "control.autoscale_interval_s": 2.0, "runtime.pipeline_helper_blocks": 4,
                 **SLOW_LINKS}
    spec = DeploySpec(name=name, min_instances=1, max_instances=2, target_concurrency=1)
    with cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
        want = backend.codec(name).decode(want_ids)
        responses = burst(server.url, [{"model": name, **BODY}] * 6)
        st = wait_status(server.url, lambda st: (
            backend.core.scale_outs_in_progress == 0 and not any(i["state"] == "pipelined" for i in st["instances"])
            and any(t["targets"] == [1] and len(t["node_full_at"]) == 1 for t in st["scale_timelines"])))
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["choices"][0]["text"] == want for r in responses)
    formed = _formed(backend)
    assert formed and set(formed[0]) == {0, 1}, formed  # the receiver (1) and the holder (0)
    tl = next(t for t in st["scale_timelines"] if t["targets"] == [1])
    assert tl["first_pipeline_at"] is not None and tl["first_pipeline_at"] < tl["node_full_at"]["1"]
    assert backend.core.stats.pipelines_dissolved == backend.core.stats.pipelines_formed >= 1


def test_a_receiver_killed_inside_a_pipeline_loses_nothing(tmp_path: Path) -> None:
    """The gateway path of bench scale's fault test (one core serves both): the last stage of the
    first pipeline dies while the burst runs. Its requests resume elsewhere with exact texts, the
    scale-out learns of the loss (the planner drops the node) and the surviving receiver ends up
    serving alone."""
    from lambdascale.core.state import Unit
    from lambdascale.model.importers import import_model

    ck = import_model("synthetic:tiny-llama", tmp_path, n_blocks=4, chunks_per_block=2)
    name = ck.dir.name
    want_ids = greedy_ids(ck.dir, PROMPT, N_TOKENS)
    overrides = {"runtime.nodes": 4, "control.autoscale_interval_s": 2.0, "runtime.heartbeat_s": 0.5, **SLOW_LINKS}
    spec = DeploySpec(name=name, min_instances=2, max_instances=4, target_concurrency=1)
    killed: list[int] = []
    with cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
        assert backend.core is not None
        core = backend.core

        def kill_first_pipeline(u: Unit) -> None:
            if u.pipelined and not killed:
                killed.append(u.nodes[-1])
                backend.kill_node(u.nodes[-1])

        core.on_unit_started.append(kill_first_pipeline)
        want = backend.codec(name).decode(want_ids)
        responses = burst(server.url, [{"model": name, **BODY}] * 8)
        wait_status(server.url, lambda st: core.scale_outs_in_progress == 0 and bool(killed))
    assert killed, "no pipeline formed"
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["choices"][0]["text"] == want for r in responses)
    assert killed[0] in core.stats.node_lost_at  # the scale-out's planner was told
    tl = next(t for t in core.controller.timelines if killed[0] in t.targets)
    survivors = set(tl.targets) - {killed[0]}
    assert survivors and all(any(not u.pipelined and u.node == n for u in core.units_seen) for n in survivors), \
        "a surviving receiver never served alone"
