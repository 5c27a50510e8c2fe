"""Model catalogues (format, built-ins, bad input naming the line), multi-model workloads, and a
simulation where many models share finite memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lambdascale.control.settings import ControlSettings
from lambdascale.sim.catalogue import CatalogueError, assign_models, builtin_names, load_catalogue, resolve
from lambdascale.sim.cluster import load_cluster
from lambdascale.sim.run import simulate, workload_for
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.systems import SYSTEMS, SystemKind
from lambdascale.sim.traces import read_trace
from lambdascale.sim.workload import Generator, SyntheticSpec, Workload, synthetic


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtins_load_and_fit_the_default_cluster() -> None:
    assert {"serverless-64", "finetunes-256"} <= set(builtin_names())
    cluster = load_cluster("h800-ib400")
    for name, n in (("serverless-64", 64), ("finetunes-256", 256)):
        cat = load_catalogue(name)
        assert len(cat) == n and len({m.name for m in cat.models}) == n
        entries = resolve(cat, cluster, 8, 16, "equal-bytes", None)
        assert all(e.weight > 0 for e in entries)
    shapes = {e.shape for e in resolve(load_catalogue("serverless-64"), cluster, 8, 16, "equal-bytes", None)}
    assert shapes == {"llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b"}


def test_csv_and_yaml_catalogues_read_the_same(tmp_path: Path) -> None:
    c = load_catalogue(_write(tmp_path, "c.csv", "# two models\nname,shape,gpus,weight\na,llama2-7b,,3\nb,llama2-13b,2,1\n"))
    y = load_catalogue(_write(tmp_path, "c.yaml", "format: lambdascale-catalogue\nformat_version: 1\nmodels:\n"
                                                  "  - {name: a, shape: llama2-7b, weight: 3}\n"
                                                  "  - {name: b, shape: llama2-13b, gpus: 2, weight: 1}\n"))
    strip = lambda cat: [(m.name, m.shape, m.gpus, m.weight) for m in cat.models]  # noqa: E731
    assert strip(c) == strip(y) == [("a", "llama2-7b", None, 3.0), ("b", "llama2-13b", 2, 1.0)]
    entries = resolve(c, load_cluster("h800-ib400"), 8, 16, "equal-bytes", None)
    assert [e.model.tp for e in entries] == [1, 2] and entries[1].model.name == "b"


@pytest.mark.parametrize("body,match", [
    ("name,shape,weight\na,llama2-7b,1\nb,gpt-9,1\n", r"c\.csv:3: model 'b': unknown shape 'gpt-9'"),
    ("name,shape,weight\na,llama2-7b,1\na,llama2-13b,1\n", r"c\.csv:3: duplicate model 'a' \(first on line 2\)"),
    ("name,shape,weight\na,llama2-7b,1\nb,llama2-7b,-2\n", r"c\.csv:3: model 'b': weight must be finite and >= 0"),
    ("name,shape,gpus,weight\na,llama2-7b,,1\nbig,llama2-70b,8,1\n", r"c\.csv:3: model 'big' .* needs 8 GPUs .* too large for any node"),
    ("name,shape,gpus,weight\nsmall,llama2-70b,1,1\n", r"c\.csv:2: model 'small': 138\.0 GB of weights do not fit 1 GPU"),
    ("name,shape\na,llama2-7b\n", r"c\.csv:2: model 'a' needs a weight or a trace"),
])
def test_bad_catalogues_name_the_line(tmp_path: Path, body: str, match: str) -> None:
    p = _write(tmp_path, "c.csv", body)
    with pytest.raises(CatalogueError, match=match):
        resolve(load_catalogue(p), load_cluster("h800-ib400"), 8, 16, "equal-bytes", None)


def test_bad_yaml_catalogue_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "c.yaml", "models:\n  - {name: a, shape: llama2-7b, weight: 1}\n"
                                   "  - {name: a, shape: llama2-7b, weight: 1}\n")
    with pytest.raises(CatalogueError, match=r"c\.yaml:3: duplicate model 'a'"):
        load_catalogue(p)


def test_a_trace_model_column_naming_an_unknown_model_names_the_line(tmp_path: Path) -> None:
    cat = load_catalogue(_write(tmp_path, "c.csv", "name,shape,weight\na,llama2-7b,1\nb,llama2-7b,1\n"))
    t = _write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens,model\n0.0,10,5,a\n1.0,10,5,b\n2.0,10,5,zz\n")
    w = read_trace(t)
    with pytest.raises(CatalogueError, match=r"t\.csv:4: model 'zz' is not in catalogue c"):
        assign_models(w, cat, 0, 4.0, trace_label=str(t))
    ok = _write(tmp_path, "ok.csv", "arrival_s,input_tokens,output_tokens,model\n0.0,10,5,b\n1.0,10,5,a\n")
    assert list(assign_models(read_trace(ok), cat, 0, 4.0).model) == [1, 0]


def test_burstgpt_csv_reads_with_its_model_column(tmp_path: Path) -> None:
    t = _write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                  "5,ChatGPT,100,20,120,Conversation log\n7,GPT-4,50,10,60,API log\n")
    w = read_trace(t)
    assert list(w.arrival_s) == [0.0, 2.0] and list(w.model_names) == ["ChatGPT", "GPT-4"]
    assert list(w.input_tokens) == [100, 50] and list(w.output_tokens) == [20, 10]


def _bursty(n_models: int = 8) -> tuple[Workload, object]:
    w = synthetic(SyntheticSpec(generator=Generator.POISSON, rate=20.0, duration_s=2000.0), seed=3)
    cat = load_catalogue("serverless-64")
    return w, cat


def test_popularity_assignment_follows_the_weights_and_keeps_bursts() -> None:
    w, cat = _bursty()
    a = assign_models(w, cat, 7, 4.0)
    b = assign_models(w, cat, 7, 4.0)
    assert np.array_equal(a.model, b.model)  # same seed, same workload
    share = np.bincount(a.model, minlength=len(cat)) / len(a)
    weights = np.array([m.weight for m in cat.models])
    assert share[0] == pytest.approx(weights[0] / weights.sum(), rel=0.1)  # the top model's share
    # bursty: the top model's per-second counts vary more than an even thinning's (Poisson: var/mean = 1)
    thin = assign_models(w, cat, 7, 1.0)

    def dispersion(x: Workload) -> float:
        c = np.bincount(x.arrival_s[x.model == 0].astype(int), minlength=2000)
        return float(c.var() / c.mean())

    assert dispersion(a) > 1.5 * dispersion(thin)


def test_many_models_share_the_cluster_and_memory_is_never_over_committed(tmp_path: Path) -> None:
    cat = _write(tmp_path, "c.csv", "name,shape,weight\n" + "".join(f"m{i},llama2-7b,{1 / (i + 1):.4f}\n" for i in range(10)))
    s = SimSettings(catalogue=str(cat), nodes=3, gpus_per_node=2, host_pool_gib=30, duration=300,
                    systems="lambdascale,serverlessllm")
    w = workload_for(s, "synthetic:onoff,rate=4,duration_s=300")
    assert w.model is not None and len(set(w.model)) > 3
    from lambdascale.sim.run import setup_catalogue

    cluster, _, entries = setup_catalogue(s)
    for kind in (SystemKind.LAMBDASCALE, SystemKind.SERVERLESSLLM):
        sim = Simulation(w, cluster, entries, SYSTEMS[kind], s, ControlSettings())
        orig = sim._sample

        def checked() -> None:
            for n in sim.nodes:
                assert 0 <= n.host_used <= n.host_total and 0 <= n.gpus_free <= n.gpus_total
                assert n.host_used == sum(sim.by_name[k].model.nbytes for k in list(n.host) + list(n.host_partial))
            orig()

        sim._sample = checked  # type: ignore[method-assign]
        r = sim.run()
        assert r.unfinished == 0
        assert sum(sum(m.starts.values()) for m in r.models) == sum(e.n_targets for e in r.scale_events)
        assert len(r.models) == 10 and r.mem_host.max() <= 1.0
    rows = simulate(s, w)
    assert [r.system for r in rows] == ["lambdascale", "serverlessllm"]


def test_a_model_with_its_own_trace_takes_that_traces_requests(tmp_path: Path) -> None:
    _write(tmp_path, "own.csv", "arrival_s,input_tokens,output_tokens\n0.5,10,5\n1.5,10,5\n")
    cat = load_catalogue(_write(tmp_path, "c.csv", "name,shape,weight,trace\na,llama2-7b,1,\nb,llama2-7b,,own.csv\n"))
    main = Workload("main", np.array([0.0, 1.0, 2.0]), np.full(3, 10), np.full(3, 5))
    w = assign_models(main, cat, 0, 4.0, read=read_trace)
    # a trace counts from its first request, so b's arrive at 0 and 1 (after a's at the same instant)
    assert list(w.arrival_s) == [0.0, 0.0, 1.0, 1.0, 2.0] and list(w.model) == [0, 1, 0, 1, 0]


def test_simulate_cli_json_has_per_model_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from lambdascale.sim import cli

    cat = _write(tmp_path, "c.csv", "name,shape,weight\na,llama2-7b,2\nb,llama2-13b,1\n")
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["simulate", "--catalogue", str(cat), "--trace", "synthetic:poisson,rate=2,duration_s=60",
                         "--nodes", "2", "--systems", "lambdascale,serverlessllm", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["catalogue"] == str(cat)
    for row in out["systems"]:
        assert {"ttft_p50_s", "ttft_p99_s", "slo_attainment", "gpu_seconds", "starts_by_tier", "bytes_by_tier",
                "evictions"} <= set(row)
        assert [m["model"] for m in row["per_model"]] == ["a", "b"]
        assert sum(m["requests"] for m in row["per_model"]) == row["requests"]
