"""Admin API and the SQLite registry (restarts lose no registration)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from lambdascale.serve.registry import ModelRegistry, RegistryError

from .conftest import MODEL


def test_deploy_update_delete_and_restart_keeps_registrations(make_app, tmp_path) -> None:
    app, backend = make_app()
    with TestClient(app) as c:
        r = c.post("/admin/models", json={"name": "llama-b", "min_instances": 1, "max_instances": 3,
                                          "target_concurrency": 2, "keep_alive_s": 5, "tiers": ["gpu", "host"]})
        assert r.status_code == 201, r.text
        assert c.post("/admin/models", json={"name": "llama-b"}).status_code == 409
        assert c.post("/admin/models", json={"name": "gone-soon"}).status_code == 201
        r = c.patch("/admin/models/llama-b", json={"max_instances": 8, "keep_alive_s": 30.5})
        assert r.status_code == 200 and r.json()["max_instances"] == 8 and r.json()["min_instances"] == 1
        assert c.delete("/admin/models/gone-soon").status_code == 200
        assert c.delete("/admin/models/gone-soon").status_code == 404
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL, "llama-b"]
        r = c.post("/v1/completions", json={"model": "llama-b", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    # A new gateway process over the same SQLite file: everything is still there, deploys re-done.
    app2, backend2 = make_app()
    with TestClient(app2) as c:
        models = {m["name"]: m for m in c.get("/admin/models").json()["data"]}
        assert set(models) == {MODEL, "llama-b"}
        assert models["llama-b"] == {"name": "llama-b", "min_instances": 1, "max_instances": 8, "target_concurrency": 2,
                                     "keep_alive_s": 30.5, "tiers": ["gpu", "host"]}
        assert c.post("/v1/completions", json={"model": "llama-b", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/completions", json={"model": "gone-soon", "prompt": "x"}).status_code == 404


def test_bad_admin_input_is_400_naming_the_field(client) -> None:
    cases = [
        ({"name": "a", "min_instances": 5, "max_instances": 2}, "min_instances"),
        ({"name": "a", "max_instances": 0}, "max_instances"),
        ({"name": "a", "keep_alive_s": -1}, "keep_alive_s"),
        ({"name": "a", "tiers": ["nvme"]}, "tiers"),
        ({"name": "a", "tiers": ["host", "host"]}, "duplicates"),
        ({"name": "../etc"}, "name"),
        ({"name": "a", "surprise": 1}, "surprise"),
        ({"name": "a", "max_instances": "3"}, "max_instances"),
    ]
    for body, fragment in cases:
        r = client.post("/admin/models", json=body)
        assert r.status_code == 400, (body, r.text)
        assert fragment in r.json()["error"]["message"], (body, r.json())
    r = client.patch(f"/admin/models/{MODEL}", json={"min_instances": 100})
    assert r.status_code == 400 and "exceeds max_instances" in r.json()["error"]["message"]
    assert client.patch("/admin/models/nope", json={"min_instances": 1}).status_code == 404


def test_registry_rejects_a_corrupt_file(tmp_path) -> None:
    p = tmp_path / "reg.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    try:
        ModelRegistry(p)
    except RegistryError as e:
        assert str(p) in str(e)
    else:
        raise AssertionError("a corrupt registry must raise RegistryError")


def test_status_shows_nodes_tiers_instances_queues(client) -> None:
    st = client.get("/admin/status").json()
    assert st["nodes"] == [{"node_id": "node-0", "alive": True, "state": "alive", "incarnation": 0, "restarts": 0,
                            "tiers": {MODEL: ["host"]}}]
    assert st["instances"][0]["model"] == MODEL and st["instances"][0]["state"] == "full"
    assert st["queues"] == {MODEL: 0}
    assert [d["name"] for d in st["deployments"]] == [MODEL]


def test_deploy_spec_maps_onto_the_control_planes_spec() -> None:
    from lambdascale.control.snapshot import DeploymentSpec, Tier
    from lambdascale.serve.schemas import DeploySpec

    c = DeploySpec(name="m", min_instances=2, max_instances=5, target_concurrency=3, keep_alive_s=9,
                   tiers=["gpu", "host"]).to_control()
    assert c == DeploymentSpec(min_instances=2, max_instances=5, target_concurrency=3, keep_alive_s=9.0,
                               cache_tiers=(Tier.GPU, Tier.HOST), scale_to_zero=False)
    assert DeploySpec(name="m").to_control().scale_to_zero


def test_status_renders_for_the_cli(client) -> None:
    from rich.console import Console

    from lambdascale.serve.cli import render_status

    st = client.get("/admin/status").json()
    st["timeline"] = ["#1 m -> [1]: decision +0ms"]
    console = Console(record=True, width=160)
    console.print(render_status(st))
    text = console.export_text()
    for fragment in ("node-0", MODEL, "full", "host/ssd", "scale events", "#1 m -> [1]"):
        assert fragment in text


def test_default_registry_lives_beside_the_models_cache_not_in_the_working_directory(monkeypatch, tmp_path) -> None:
    from lambdascale.serve.settings import ServeSettings

    monkeypatch.setenv("HOME", str(tmp_path))
    path = ServeSettings().registry_path
    assert path == tmp_path / ".cache" / "lambdascale" / "registry.sqlite"


def test_status_shows_each_nodes_state_incarnation_and_restarts(client) -> None:
    from rich.console import Console

    from lambdascale.serve.cli import render_status

    st = client.get("/admin/status").json()
    assert {"state", "incarnation", "restarts"} <= set(st["nodes"][0])
    st["nodes"] = [{"node_id": "0", "alive": True, "state": "alive", "incarnation": 3, "restarts": 2,
                    "tiers": {MODEL: ["gpu"]}},
                   {"node_id": "1", "alive": False, "state": "dead", "incarnation": 1, "restarts": 0, "tiers": {}},
                   {"node_id": "2", "alive": True, "state": "suspect", "incarnation": 1, "restarts": 0, "tiers": {}}]
    console = Console(record=True, width=160)
    console.print(render_status(st))
    cells = [ln.replace("│", " ").replace("┃", " ").split() for ln in console.export_text().splitlines()]
    rows = {c[0]: c for c in cells if c and c[0] in ("0", "1", "2")}
    assert rows["0"][1:4] == ["alive", "3", "2"] and rows["1"][1:3] == ["DEAD", "1"] and rows["2"][1] == "suspect"
