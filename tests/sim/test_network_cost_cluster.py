"""Flow-level network sharing, cost model interpolation, presets and calibration files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdascale.model.arch import SHAPES
from lambdascale.sim.cluster import ClusterError, block_nbytes, load_cluster, preset_names, resolve_model
from lambdascale.sim.costmodel import CalibrationError, CostModel, load_calibration
from lambdascale.sim.events import EventLoop
from lambdascale.sim.network import Network


def _net() -> tuple[EventLoop, Network, dict[str, float]]:
    loop = EventLoop()
    net = Network(loop)
    for link, cap in {"a": 100.0, "b": 100.0, "c": 50.0}.items():
        net.add_link(link, cap)
    return loop, net, {}


def test_uncontended_flow_takes_bytes_over_bottleneck() -> None:
    loop, net, done = _net()
    net.start(("a", "c"), 100.0, lambda f: done.__setitem__("x", loop.now()))
    loop.run()
    assert done["x"] == pytest.approx(2.0)


def test_max_min_fair_sharing_and_rate_change_on_completion() -> None:
    loop, net, done = _net()
    # Two flows share link a (100): 50 each. Flow y also crosses c (50) so it is capped at 50 anyway.
    net.start(("a",), 100.0, lambda f: done.__setitem__("x", loop.now()))
    net.start(("a", "c"), 200.0, lambda f: done.__setitem__("y", loop.now()))
    # A third flow only on b is unaffected.
    net.start(("b",), 100.0, lambda f: done.__setitem__("z", loop.now()))
    loop.run()
    assert done["x"] == pytest.approx(2.0)
    assert done["z"] == pytest.approx(1.0)
    # y: 100 bytes in the first 2 s at 50/s, then still capped at 50 by c -> 2 more seconds.
    assert done["y"] == pytest.approx(4.0)


def test_max_min_gives_leftover_to_unconstrained_flow() -> None:
    loop, net, done = _net()
    net.start(("a", "c"), 100.0, lambda f: done.__setitem__("slow", loop.now()))  # capped at 50 by c
    net.start(("a",), 100.0, lambda f: done.__setitem__("fast", loop.now()))     # gets the other 50
    loop.run()
    assert done["slow"] == pytest.approx(2.0) and done["fast"] == pytest.approx(2.0)
    loop2, net2, done2 = _net()
    net2.start(("a", "c"), 50.0, lambda f: done2.__setitem__("slow", loop2.now()))
    net2.start(("a",), 150.0, lambda f: done2.__setitem__("fast", loop2.now()))
    loop2.run()
    # both at 50 until slow ends at 1 s, then fast alone at 100: 100 left -> 2 s.
    assert done2["fast"] == pytest.approx(2.0)


def test_unknown_link_is_an_error() -> None:
    loop, net, _ = _net()
    with pytest.raises(KeyError, match="nope"):
        net.start(("nope",), 1.0, lambda f: None)


def test_cost_model_interpolates_and_scales() -> None:
    cal = load_calibration("h200")
    arch = SHAPES["llama2-13b"]
    m = CostModel.build(cal, "llama2-13b", arch)
    t = cal.models["llama2-13b"]
    assert m.prefill_s(512) == pytest.approx(t.prefill_ms_per_layer[512] * 1e-3 * 40)
    assert m.prefill_s(10) == pytest.approx(m.prefill_s(128))  # floor below the first point
    mid = (t.decode_ms_per_layer[8] + t.decode_ms_per_layer[32]) / 2 * 1e-3
    assert m.decode_s(20, layers=1) == pytest.approx(mid)
    slow = CostModel.build(cal, "llama2-13b", arch, decode_scale=2.0, tp=4, tp_overhead=0.0)
    assert slow.decode_s(8) == pytest.approx(m.decode_s(8) * 2.0 / 4)
    # A shape without its own entry borrows the nearest one, scaled by layer bytes.
    small = CostModel.build(cal, "tiny-llama", SHAPES["tiny-llama"])
    assert 0 < small.decode_s(1) < m.decode_s(1)


def test_moe_computes_by_active_params_and_moves_total_bytes() -> None:
    """Mixtral-8x7B's step costs what a dense model of its active weights costs (router + 2 of 8
    experts per layer), while its blocks carry all 8 experts."""
    cal = load_calibration("h200")
    moe = SHAPES["mixtral-8x7b"]
    assert moe.moe is not None
    # the dense model of the same active shape: one MLP as wide as the two active experts
    dense = moe.model_copy(update={"moe": None, "intermediate_size": 2 * moe.moe.expert_intermediate_size})
    m, d = CostModel.build(cal, "mixtral-8x7b", moe), CostModel.build(cal, "dense", dense)
    assert m.decode_s(8) == pytest.approx(d.decode_s(8), rel=1e-3)  # only the router differs
    assert m.prefill_s(512) == pytest.approx(d.prefill_s(512), rel=1e-3)
    total = sum(block_nbytes(moe, 8))
    assert total == moe.total_bytes() > 3.5 * sum(block_nbytes(dense, 8))  # 46.7B vs 12.9B params
    assert moe.total_params() / 1e9 == pytest.approx(46.7, rel=0.01)
    assert (moe.total_params() - moe.num_hidden_layers * (moe.layer_params() - moe.active_layer_params())) / 1e9 == \
        pytest.approx(12.9, rel=0.01)


def test_calibration_errors_name_field(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"format": "lambdascale-calibration", "format_version": 1, "device": "x",
                               "copy": {"h2d_GBps": 1, "d2h_GBps": 1, "ssd_read_GBps": 1},
                               "models": {"m": {"layer_bytes": -1, "prefill_ms_per_layer": {"1": 1},
                                                "decode_ms_per_layer": {"1": 1}}}}))
    with pytest.raises(CalibrationError, match="models.m.layer_bytes"):
        load_calibration(bad)
    with pytest.raises(CalibrationError, match="unknown calibration"):
        load_calibration("tpu9")


def test_raw_shared_calibration_converts(calibration_dir: Path) -> None:
    raw = load_calibration(calibration_dir / "h200_2026-11-28.json")
    pkg = load_calibration("h200")
    assert raw.models["llama2-70b"].prefill_ms_per_layer == pkg.models["llama2-70b"].prefill_ms_per_layer


def test_presets_and_models(tmp_path: Path) -> None:
    assert {"h800-ib400", "h200-ib400", "a100-roce100"} <= set(preset_names())
    c = load_cluster("h800-ib400")
    assert c.links.nic_gbps == 400 and c.gpus_per_node == 4
    assert resolve_model("llama-2-70b").tp == 4 and resolve_model("13b").tp == 1
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\ngpu: {name: g, memory_gib: 0}\nhost_memory_gib: 1\nlinks: {nic_gbps: 1, pcie_GBps: 1, nvlink_GBps: 1, ssd_GBps: 1}\n")
    with pytest.raises(ClusterError, match="gpu.memory_gib"):
        load_cluster(bad)
    with pytest.raises(ClusterError, match="presets: "):
        load_cluster("tpu-pod")


def test_model_from_our_manifest(tmp_path: Path) -> None:
    arch = SHAPES["tiny-llama"]
    d = tmp_path / "tiny"
    d.mkdir()
    blocks = [{"index": b, "layers": [2 * b, 2 * b + 2], "file": f"block_{b:03d}.safetensors", "nbytes": 1000,
               "chunks": []} for b in range(4)]
    (d / "manifest.json").write_text(json.dumps({"format": "lambdascale-blocks", "format_version": 1, "name": "tiny",
                                                 "arch": json.loads(arch.model_dump_json()), "dtype": "float32",
                                                 "blocks": blocks}))
    m = resolve_model(str(d), n_blocks=4, n_chunks=8)
    assert (m.name, m.nbytes, m.tp, m.n_blocks, m.n_chunks) == ("tiny", 4000, 1, 4, 8)
    (d / "manifest.json").write_text("{}")
    with pytest.raises(Exception, match="not a lambdascale manifest"):
        resolve_model(str(d))
