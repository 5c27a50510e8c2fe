"""``lambdascale serve | deploy | update | delete | status`` (``bench serve`` is in ``lambdascale.bench.cli``).

Options come from the config tree (``add_config_args``) and, for scaling settings, from the
fields of :class:`DeploySpec`, so every default is written once. Handlers import heavy libraries
lazily. Admin commands talk to a running gateway over HTTP (``--url``, ``--api-key`` or
``$LAMBDASCALE_API_KEY``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from lambdascale.errors import LambdaScaleError

_DEPLOY_FIELDS = ("min_instances", "max_instances", "target_concurrency", "keep_alive_s")


class GatewayRequestError(LambdaScaleError):
    """The gateway answered an admin call with an error, or could not be reached."""


def default_url() -> str:
    from lambdascale.serve.settings import ServeSettings

    s = ServeSettings()
    return os.environ.get("LAMBDASCALE_URL", f"http://{s.host}:{s.port}")


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help=f"gateway URL (default: $LAMBDASCALE_URL or {default_url()})")
    p.add_argument("--api-key", default=None, help="admin API key (default: $LAMBDASCALE_API_KEY)")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    from lambdascale.serve.schemas import DeploySpec

    defaults = DeploySpec(name="x")
    for name in _DEPLOY_FIELDS:
        f = DeploySpec.model_fields[name]
        typ = int if f.annotation is int else float
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=f"{f.description} (default: {getattr(defaults, name)})")
    p.add_argument("--tier", action="append", choices=["gpu", "host", "ssd"], default=None,
                   help=f"{DeploySpec.model_fields['tiers'].description}; repeat for several (default: {defaults.tiers})")


def _spec_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {n: getattr(args, n) for n in _DEPLOY_FIELDS if getattr(args, n) is not None}
    if args.tier:
        body["tiers"] = args.tier
    return body


def register(sub: argparse._SubParsersAction) -> None:
    from lambdascale.config import add_config_args

    p = sub.add_parser("serve", help="run the controller and the OpenAI-compatible gateway until Ctrl-C")
    p.add_argument("--config", default=None, help="config file (YAML/JSON); `lambdascale config` lists the fields")
    add_config_args(p, "serve", ["host", "port", "backend", "registry_path", "max_queue_per_model"])
    add_config_args(p, "runtime", ["nodes", "launcher", "address", "pipeline_helper_blocks"])
    p.add_argument("--model", action="append", default=None,
                   help="model to deploy at startup (repeatable; default: the demo model smollm2-135m)")
    p.add_argument("--api-key", action="append", default=None, help="accept this key for inference (repeatable)")
    p.add_argument("--admin-api-key", action="append", default=None, help="accept this key for admin (repeatable)")
    p.add_argument("--models-dir", default=None, help="models directory (default: paths.models_dir)")
    p.set_defaults(func=_cmd_serve)

    d = sub.add_parser("deploy", help="register a model on a running gateway with its scaling settings")
    d.add_argument("name", help="model name (as in the models directory)")
    _add_spec_args(d)
    add_client_args(d)
    d.set_defaults(func=_cmd_deploy)

    u = sub.add_parser("update", help="change a deployed model's scaling settings")
    u.add_argument("name")
    _add_spec_args(u)
    add_client_args(u)
    u.set_defaults(func=_cmd_update)

    r = sub.add_parser("delete", help="stop serving a model and remove its registration")
    r.add_argument("name")
    add_client_args(r)
    r.set_defaults(func=_cmd_delete)

    s = sub.add_parser("status", help="nodes, tiers per model per node, instances, pipelines, queues")
    add_client_args(s)
    s.add_argument("--watch", action="store_true", help="refresh live until Ctrl-C")
    s.add_argument("--interval", type=float, default=None, help="refresh period in seconds (default: serve.status_refresh_s)")
    s.add_argument("--json", action="store_true", help="print the raw status JSON")
    s.set_defaults(func=_cmd_status)


# ---- admin client -------------------------------------------------------------------------------

def admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin HTTP call; raises :class:`GatewayRequestError` with the gateway's message."""
    import httpx

    url = (args.url or default_url()).rstrip("/")
    key = args.api_key or os.environ.get("LAMBDASCALE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as e:
        raise GatewayRequestError(f"cannot reach the gateway at {url}: {e}") from None
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:300]
        raise GatewayRequestError(f"{method} {path} failed with {r.status_code}: {msg}")
    return r.json()


def _cmd_deploy(args: argparse.Namespace) -> int:
    spec = admin_call(args, "POST", "/admin/models", {"name": args.name, **_spec_body(args)})
    print(f"deployed {spec['name']}: " + ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name"))
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    body = _spec_body(args)
    if not body:
        raise GatewayRequestError("nothing to update: give at least one of " +
                                  ", ".join("--" + n.replace("_", "-") for n in _DEPLOY_FIELDS) + ", --tier")
    spec = admin_call(args, "PATCH", f"/admin/models/{args.name}", body)
    print(f"updated {spec['name']}: " + ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name"))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    admin_call(args, "DELETE", f"/admin/models/{args.name}")
    print(f"deleted {args.name}")
    return 0


def render_status(st: dict[str, Any]) -> Any:
    """A rich renderable of ``GET /admin/status``."""
    from rich.console import Group
    from rich.table import Table

    nodes = Table(title="nodes", title_justify="left")
    for col in ("node", "state", "incarnation", "restarts", "models by tier"):
        nodes.add_column(col)
    for n in st["nodes"]:
        tiers = ", ".join(f"{m}: {'/'.join(ts)}" for m, ts in sorted(n["tiers"].items())) or "-"
        state = n.get("state", "alive" if n["alive"] else "dead")
        shown = {"alive": "alive", "dead": "[red]DEAD[/red]"}.get(state, f"[yellow]{state}[/yellow]")
        nodes.add_row(str(n["node_id"]), shown, str(n.get("incarnation", "")), str(n.get("restarts", 0)), tiers)
    inst = Table(title="instances and pipelines", title_justify="left")
    for col in ("instance", "model", "state", "nodes", "running"):
        inst.add_column(col)
    for i in st["instances"]:
        inst.add_row(i["instance_id"], i["model"], i["state"], " -> ".join(map(str, i["nodes"])), str(i["running"]))
    models = Table(title="models", title_justify="left")
    for col in ("model", "min", "max", "target conc.", "keep-alive s", "tiers", "queued", "admitted"):
        models.add_column(col)
    for d in st["deployments"]:
        models.add_row(d["name"], str(d["min_instances"]), str(d["max_instances"]), str(d["target_concurrency"]),
                       f"{d['keep_alive_s']:g}", "/".join(d["tiers"]), str(st["queues"].get(d["name"], 0)),
                       str(st["admitted"].get(d["name"], 0)))
    parts: list[Any] = [nodes, inst, models]
    if st.get("timeline"):
        tl = Table(title="scale events (latest)", title_justify="left")
        tl.add_column("event")
        for line in st["timeline"][-8:]:
            tl.add_row(line)
        parts.append(tl)
    return Group(*parts)


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.json:
        print(json.dumps(admin_call(args, "GET", "/admin/status"), indent=2))
        return 0
    console = Console()
    if not args.watch:
        console.print(render_status(admin_call(args, "GET", "/admin/status")))
        return 0
    from lambdascale.serve.settings import ServeSettings

    try:
        watch_status(args, console, threading.Event(), args.interval or ServeSettings().status_refresh_s)
    except KeyboardInterrupt:
        pass
    return 0


def watch_status(args: argparse.Namespace, console: Any, stop: threading.Event, interval: float) -> int:
    """Refresh the status view every ``interval`` seconds until ``stop`` is set (Ctrl-C in the CLI)."""
    from rich.live import Live

    refreshes = 0
    with Live(render_status(admin_call(args, "GET", "/admin/status")), console=console, refresh_per_second=4) as live:
        while not stop.wait(interval):
            live.update(render_status(admin_call(args, "GET", "/admin/status")), refresh=True)
            refreshes += 1
    return refreshes


# ---- serve --------------------------------------------------------------------------------------

def _cmd_serve(args: argparse.Namespace) -> int:
    from lambdascale.config import config_from_args
    from lambdascale.serve.launch import serve_forever

    cfg = config_from_args(args)
    serve_over: dict[str, Any] = {}
    if args.model:
        serve_over["model"] = args.model
    if args.api_key:
        serve_over["api_keys"] = args.api_key
    if args.admin_api_key:
        serve_over["admin_api_keys"] = args.admin_api_key
    if serve_over:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_validate(cfg.serve.model_dump() | serve_over)})
    explicit_cluster = any(getattr(args, f"cfg__runtime__{n}") is not None for n in ("nodes", "launcher", "address"))
    return serve_forever(cfg, explicit_cluster=explicit_cluster, out=sys.stdout)
