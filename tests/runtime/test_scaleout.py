"""A burst served while the model scales out: execute-while-load forms and dissolves pipelines,
and every output equals a single-node run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.sequence import TokenState
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.bench.burst import SystemKind, prepare_sources, serve_scale_out
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings
from tests.runtime.conftest import run_async

BURST = {
    f"r{i}": TokenState(tuple(range(1 + i, 9 + i)), (), SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.9,
                                                                       ignore_eos=True), 7 + i)
    for i in range(6)
}


@pytest.fixture(scope="module")
def burst_reference(tiny_model: Path) -> dict[str, list[int]]:
    eng = Engine.from_checkpoint(tiny_model)
    out = {}
    for rid, st in BURST.items():
        out[rid] = [t for o in eng.stream(eng.resume(st, request_id=rid)) for t in o.token_ids]
    return out


@pytest.mark.parametrize("system,kv", [("lambdascale", "recompute"), ("lambdascale", "ship")])
def test_burst_during_scale_out_is_exact(tiny_model: Path, burst_reference, system: str, kv: str) -> None:
    """2 sources, 3 receivers: the sources deal complementary blocks first, so pipelines form.
    On dissolution the requests' KV is recomputed, or shipped to the new full instances."""
    # ~2.5 MB/s links: the 1.3 MB model needs about a second to reach every node
    link = TransferSettings(link_gbps=0.02, bucket_burst_bytes=32 << 10, io_slice_bytes=16 << 10)

    async def main():
        async with LocalCluster(5, link, RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            await prepare_sources(lc.cluster, 5, [0, 1], tiny_model)
            return await serve_scale_out(lc.cluster, tiny_model, manifest, [0, 1], [2, 3, 4], BURST, system, max_seqs=2,
                                         kv_policy=kv, emulate_device="h200:llama2-7b:5")

    rep = run_async(main(), timeout=180)
    assert rep.outputs == burst_reference
    assert set(rep.ttft) == set(BURST) and set(rep.node_serving_s) == {2, 3, 4}
    if system == SystemKind.LAMBDASCALE:
        assert rep.pipelines_formed >= 1, "execute-while-load never formed a pipeline"
        assert rep.pipelines_dissolved == rep.pipelines_formed  # every pipeline ends when nodes are full
        assert rep.kv_shipped + rep.kv_recomputed == rep.requests_moved
        # emulated 7B steps keep every instance busy, so the pipeline carries requests when it dissolves
        assert rep.requests_moved >= 1
        if kv == "recompute":
            assert rep.kv_shipped == 0 and rep.kv_bytes_shipped == 0
        else:  # shipped to the new full instances, which continue with a decode: still exact
            assert rep.kv_shipped >= 1 and rep.kv_bytes_shipped > 0
    else:
        assert rep.pipelines_formed == 0


def test_node_killed_inside_a_pipeline_requests_complete_elsewhere(tiny_model: Path, burst_reference) -> None:
    link = TransferSettings(link_gbps=0.02, bucket_burst_bytes=32 << 10, io_slice_bytes=16 << 10)
    killed: list[int] = []

    async def main():
        async with LocalCluster(5, link, RuntimeSettings(heartbeat_s=1.0)) as lc:
            manifest = read_manifest(tiny_model)
            await prepare_sources(lc.cluster, 5, [0, 1], tiny_model)

            def formed(name: str, nodes: list[int]) -> None:
                if not killed:
                    killed.append(nodes[-1])
                    lc.launcher.kill(nodes[-1])  # the last stage: the pipeline's next step fails

            # emulated 7B steps keep the sources busy, so the queue still holds requests when the
            # first pipeline forms and the pipeline is serving some when its stage dies
            return await serve_scale_out(lc.cluster, tiny_model, manifest, [0, 1], [2, 3, 4], BURST, "lambdascale",
                                         max_seqs=2, on_pipeline_formed=formed, emulate_device="h200:llama2-7b:5")

    rep = run_async(main(), timeout=180)
    assert len(killed) == 1 and rep.multicast is not None and rep.multicast.lost == tuple(killed)
    assert rep.instances_failed == 1 and rep.requests_moved >= 1
    assert rep.outputs == burst_reference  # every request completed, exactly
    survivors = {2, 3, 4} - set(killed)
    assert survivors <= set(rep.node_serving_s)
    # the planner learned of the loss (remove_node) and an instance started after it served
    lost_at = rep.nodes_lost_s[killed[0]]
    later = [n for n, t in rep.instance_started_s.items() if t >= lost_at and rep.tokens_by_instance.get(n, 0) > 0]
    assert later, f"no instance started after the loss served: {rep.instance_started_s} {rep.tokens_by_instance}"
    assert all(killed[0] not in rep.instance_nodes[n] for n, t in rep.instance_started_s.items() if t >= lost_at)


def test_sources_lend_stages_to_an_early_pipeline_and_outputs_stay_exact(tiny_model: Path, burst_reference) -> None:
    """With ``runtime.pipeline_helper_blocks`` the sources run the blocks no receiver holds yet:
    the first pipeline has a stage on a source, and every output still equals the single-node
    run (the source's stage runs beside its own full instance, on the same device)."""
    link = TransferSettings(link_gbps=0.02, bucket_burst_bytes=32 << 10, io_slice_bytes=16 << 10)

    async def main():
        async with LocalCluster(5, link, RuntimeSettings(heartbeat_s=1.0, pipeline_helper_blocks=4)) as lc:
            manifest = read_manifest(tiny_model)
            await prepare_sources(lc.cluster, 5, [0, 1], tiny_model)
            return await serve_scale_out(lc.cluster, tiny_model, manifest, [0, 1], [2, 3, 4], BURST, "lambdascale",
                                         max_seqs=2, emulate_device="h200:llama2-7b:5")

    rep = run_async(main(), timeout=180)
    assert rep.outputs == burst_reference
    pipes = [n for n in rep.instance_started_s if "@pipe" in n]
    assert pipes, "no pipeline formed"
    first = min(pipes, key=lambda n: rep.instance_started_s[n])
    assert set(rep.instance_nodes[first]) & {0, 1}, f"the first pipeline {rep.instance_nodes[first]} has no source stage"
    assert rep.pipelines_dissolved == rep.pipelines_formed
    assert set(rep.node_serving_s) == {2, 3, 4}


def test_a_source_killed_while_it_runs_a_stage_loses_nothing(tiny_model: Path, burst_reference) -> None:
    """The source lending a stage to the first pipeline dies: the pipeline's requests, and the
    source's own, resume elsewhere with exact outputs, and the multicast finishes from the other
    source."""
    link = TransferSettings(link_gbps=0.02, bucket_burst_bytes=32 << 10, io_slice_bytes=16 << 10)
    killed: list[int] = []

    async def main():
        async with LocalCluster(5, link, RuntimeSettings(heartbeat_s=1.0, pipeline_helper_blocks=4)) as lc:
            manifest = read_manifest(tiny_model)
            await prepare_sources(lc.cluster, 5, [0, 1], tiny_model)

            def formed(name: str, nodes: list[int]) -> None:
                lenders = [n for n in nodes if n in (0, 1)]
                if lenders and not killed:
                    killed.append(lenders[0])
                    lc.launcher.kill(lenders[0])

            return await serve_scale_out(lc.cluster, tiny_model, manifest, [0, 1], [2, 3, 4], BURST, "lambdascale",
                                         max_seqs=2, on_pipeline_formed=formed, emulate_device="h200:llama2-7b:5")

    rep = run_async(main(), timeout=240)
    assert len(killed) == 1, "no pipeline ran a stage on a source"
    assert rep.outputs == burst_reference
    assert set(rep.node_serving_s) == {2, 3, 4}
    assert rep.instances_failed >= 1 and rep.requests_moved >= 1
