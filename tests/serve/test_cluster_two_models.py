"""Scale-outs through the gateway run side by side: two models' multicasts (each reads its own
queue of the cluster's events), and one model's successive scale-outs (each multicast is its own
run on the shared source), instead of one waiting for the other; everything serves."""

from __future__ import annotations

from pathlib import Path

from lambdascale.serve.schemas import DeploySpec
from tests.serve.cluster_helpers import SLOW_LINKS, burst, cluster_gateway, wait_status

PROMPT = [1, 5, 9, 13]


def _filled(st: dict) -> list[dict]:
    """Network scale-outs whose multicast filled every target."""
    return [t for t in st["scale_timelines"]
            if t["first_chunk_at"] is not None and t["targets"] and len(t["node_full_at"]) == len(t["targets"])]


def _body(model: str, n: int) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}


def test_bursts_on_two_models_spread_both_at_once(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    names = [import_model("synthetic:tiny-llama", tmp_path, name=n, n_blocks=4, chunks_per_block=2, seed=i).dir.name
             for i, n in enumerate(("tiny-a", "tiny-b"))]
    specs = [DeploySpec(name=n, min_instances=1, max_instances=2, target_concurrency=1) for n in names]
    overrides = {"runtime.nodes": 4, "control.autoscale_interval_s": 1.0, **SLOW_LINKS}
    with cluster_gateway(tmp_path, overrides, specs) as (backend, server):
        responses = burst(server.url, [_body(n, 120) for n in names for _ in range(4)])
        st = wait_status(server.url, lambda st: backend.core.scale_outs_in_progress == 0
                         and len({t["model"] for t in _filled(st)}) == 2)
    assert [r.status_code for r in responses] == [200] * 8
    tl = {t["model"]: t for t in _filled(st)}
    assert set(tl) == set(names), st["scale_timelines"]
    a, b = (tl[n] for n in names)
    # the windows [first chunk, last node full] overlap: neither multicast waited for the other
    assert a["first_chunk_at"] < max(b["node_full_at"].values()) and b["first_chunk_at"] < max(a["node_full_at"].values())


def test_successive_scale_outs_of_one_model_multicast_side_by_side(tmp_path: Path) -> None:
    from lambdascale.model.importers import import_model

    name = import_model("synthetic:tiny-llama", tmp_path, name="tiny-a", n_blocks=4, chunks_per_block=2).dir.name
    # one instance more per 1 s tick, while each multicast over 3 Mbit/s links takes seconds
    overrides = {"runtime.nodes": 4, "control.autoscale_interval_s": 1.0, "control.scale_max_add_per_tick": 1,
                 **SLOW_LINKS}
    spec = DeploySpec(name=name, min_instances=1, max_instances=4, target_concurrency=1)
    with cluster_gateway(tmp_path, overrides, [spec]) as (backend, server):
        responses = burst(server.url, [_body(name, 150)] * 8)
        st = wait_status(server.url, lambda st: backend.core.scale_outs_in_progress == 0 and len(_filled(st)) >= 2)
    assert [r.status_code for r in responses] == [200] * 8
    tl = sorted(_filled(st), key=lambda t: t["first_chunk_at"])
    assert len(tl) >= 2, st["scale_timelines"]
    a, b = tl[0], tl[1]
    assert set(a["targets"]).isdisjoint(b["targets"])
    # the second scale-out's first chunk came before the first's last node was full
    assert b["first_chunk_at"] < max(a["node_full_at"].values()), (a, b)
