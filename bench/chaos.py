"""Chaos benchmark (issue 20): mixed load on the embedded default while nodes are paused and killed.

A gateway on the cluster backend (``runtime.nodes`` local agents, default 4, the gateway's
supervisor on) serves one model, by default the demo model when it is imported (else the synthetic
tiny-llama), to ``--clients`` clients sending a mix of requests: chat and completions, streamed and
not, greedy and seeded sampling, short and long outputs. Every ``--every-min``..``--every-max``
seconds (default 30-60) a random node is paused (SIGSTOP for ``--pause-min``..``--pause-max`` s,
longer than the heartbeat limit, then SIGCONT) or killed (``kill -9``; the supervisor restarts
it). Requests in flight through a node that dies must move and finish: the run reports

* per fault: time to detect (fault -> declared dead), time until the node is back (a new
  incarnation alive) and until it serves again (a request dispatched to a unit formed on that
  incarnation), a pause's from its SIGCONT, a kill's from the kill;
* requests per outcome: 200, each 4xx/5xx code, and hung (no answer within ``--timeout`` s);
  a run passes with zero 5xx and zero hung;
* nodes alive over time, as a plot (matplotlib) next to the JSON.

Usage: ``PYTHONPATH=. .venv/bin/python bench/chaos.py [--minutes 10] [--out DIR] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from lambdascale.config import load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.cluster_backend import ClusterBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec
from lambdascale.serve.server import ServerThread

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count to five.", "Say hello.",
             "What is two plus two?", "Describe the sea in one sentence."]


def pick_model(models_dir: Path | None) -> tuple[Path, str]:
    from lambdascale.model.checkpoint import list_models
    from lambdascale.model.importers import DEMO_MODEL, import_model

    if models_dir is not None and any(m.name == DEMO_MODEL for m in list_models(models_dir)):
        return models_dir, DEMO_MODEL
    d = Path(tempfile.mkdtemp(prefix="chaos-models-"))
    return d, import_model("synthetic:tiny-llama", d, n_blocks=4, chunks_per_block=1).dir.name


class Client(threading.Thread):
    """One client: a seeded mix of requests until stopped; each outcome recorded."""

    def __init__(self, k: int, url: str, model: str, chat: bool, timeout_s: float, stop: threading.Event,
                 out: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.k, self.url, self.model, self.chat, self.timeout_s, self.stop, self.out = k, url, model, chat, timeout_s, stop, out
        self.rng = random.Random(k)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                body: dict[str, Any] = {"model": self.model, "max_tokens": self.rng.choice([4, 8, 16, 32]),
                                        "stream": self.rng.random() < 0.5}
                if self.rng.random() < 0.5:
                    body |= {"temperature": 0}
                else:
                    body |= {"temperature": 0.8, "seed": self.rng.randrange(1 << 30)}
                chat = self.chat and self.rng.random() < 0.5
                q = self.rng.choice(QUESTIONS)
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body |= {"messages": [{"role": "user", "content": q}]} if chat else {"prompt": q}
                t0 = time.monotonic()
                try:
                    if body["stream"]:
                        with c.stream("POST", path, json=body) as r:
                            status = r.status_code
                            err = any(ln.startswith("data: ") and '"error"' in ln for ln in r.iter_lines())
                            status = 500 if (status == 200 and err) else status
                    else:
                        status = c.post(path, json=body).status_code
                except httpx.TimeoutException:
                    status = -1  # hung
                self.out.append({"t": t0, "s": time.monotonic() - t0, "status": status, "stream": body["stream"]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--every-min", type=float, default=30.0)
    p.add_argument("--every-max", type=float, default=60.0)
    p.add_argument("--pause-min", type=float, default=6.0, help="a pause lasts past the 5 s heartbeat limit")
    p.add_argument("--pause-max", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=180.0, help="a request without an answer by then is hung")
    p.add_argument("--models-dir", type=Path, default=None, help="where the demo model is (else a synthetic one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rng = random.Random(args.seed)
    models_dir, name = pick_model(args.models_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"runtime.nodes": args.nodes, "runtime.register_timeout_s": 300,
                             "runtime.agent_log_file": str(args.out / "agents.log")})
    backend = ClusterBackend(cfg, models_dir)
    reg = ModelRegistry(":memory:")
    reg.put(DeploySpec(name=name, min_instances=args.nodes, max_instances=args.nodes))
    server = ServerThread(create_app(cfg, backend, registry=reg)).start(timeout_s=600)
    c = backend.cluster
    chat = args.models_dir is not None  # the demo model has a chat template; the synthetic one may not
    try:
        t_serve = time.monotonic()
        while len(backend.core.deployments[name].serving) < args.nodes and time.monotonic() - t_serve < 300:
            time.sleep(0.2)  # polling the gateway's state until every node serves
        stop = threading.Event()
        results: list[dict[str, Any]] = []
        clients = [Client(k, server.url, name, chat, args.timeout, stop, results) for k in range(args.clients)]
        t0 = time.monotonic()
        for cl in clients:
            cl.start()
        end = t0 + args.minutes * 60
        series: list[tuple[float, int]] = []
        faults: list[dict[str, Any]] = []
        next_fault = t0 + rng.uniform(args.every_min, args.every_max)
        paused: dict[int, float] = {}
        while time.monotonic() < end:
            now = time.monotonic()
            series.append((now - t0, len(c.healthy())))
            for n, until in list(paused.items()):
                if now >= until:
                    backend.signal_node(n, signal.SIGCONT)
                    del paused[n]
                    next(f for f in reversed(faults) if f["node"] == n)["continued"] = time.monotonic()
            if now >= next_fault and not paused:
                n = rng.randrange(args.nodes)
                kind = rng.choice(["pause", "kill"])
                faults.append({"node": n, "kind": kind, "at": now, "inc": c.incarnation(n)})
                if kind == "pause":
                    backend.signal_node(n, signal.SIGSTOP)
                    paused[n] = now + rng.uniform(args.pause_min, args.pause_max)
                else:
                    backend.kill_node(n)
                next_fault = now + rng.uniform(args.every_min, args.every_max)
            time.sleep(0.25)  # the sampling period of the nodes-alive series
        for n in paused:
            backend.signal_node(n, signal.SIGCONT)
        stop.set()
        for cl in clients:
            cl.join(timeout=args.timeout + 10)
        report = summarize(backend, faults, results, series, t0, args)
    finally:
        server.stop(timeout_s=120)
    (args.out / "chaos.json").write_text(json.dumps(report, indent=2))
    plot(series, faults, t0, args.out / "nodes_alive.png", args.nodes)
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=2))
    for f in report["faults"]:
        print(f)
    ok = report["outcomes"].get("hung", 0) == 0 and not any(k.startswith("5") for k in report["outcomes"])
    print("PASS: zero 5xx, zero hung" if ok else "FAIL: 5xx or hung requests")
    return 0 if ok else 1


def summarize(backend: ClusterBackend, faults: list[dict[str, Any]], results: list[dict[str, Any]],
              series: list[tuple[float, int]], t0: float, args: argparse.Namespace) -> dict[str, Any]:
    c = backend.cluster
    units = list(backend.core.units_seen)
    hist = list(c.history)
    out = []
    for f in faults:
        n, at = f["node"], f["at"]
        dead = next((e.at for e in hist if e.node == n and e.incarnation == f["inc"] and e.state.value == "dead"), None)
        back = next((e for e in hist if e.node == n and e.incarnation > f["inc"] and e.state.value == "alive"), None)
        # the first request dispatched to a unit formed on the new incarnation (core clock = monotonic)
        serving = min((u.first_request_at for u in units if back is not None and u.first_request_at is not None
                       and u.members.get(n) == back.incarnation), default=None)
        # a pause is back when continued plus its re-registration: time that from the SIGCONT
        since = f.get("continued", at)
        out.append({"node": n, "kind": f["kind"], "at_s": round(at - t0, 1),
                    "paused_s": round(since - at, 2) if "continued" in f else None,
                    "detect_s": None if dead is None else round(dead - at, 2),
                    "back_s": None if back is None else round(back.at - since, 2),
                    "serving_s": None if serving is None else round(serving - since, 2)})
    outcomes: dict[str, int] = {}
    for r in results:
        k = "hung" if r["status"] == -1 else str(r["status"])
        outcomes[k] = outcomes.get(k, 0) + 1

    def stat(key: str, kind: str) -> dict[str, float] | None:
        xs = [f[key] for f in out if f[key] is not None and f["kind"] == kind]
        return {"median": round(statistics.median(xs), 2), "max": round(max(xs), 2), "n": len(xs)} if xs else None

    restarts = backend._lc.launcher.restarts()
    return {"minutes": args.minutes, "nodes": args.nodes, "clients": args.clients, "requests": len(results),
            "outcomes": outcomes,
            # pause: detect from SIGSTOP; back and serving from SIGCONT. kill: all three from the kill
            **{f"{kind}_{key}": stat(key, kind) for kind in ("pause", "kill") for key in ("detect_s", "back_s", "serving_s")},
            "restarts": restarts, "fenced": dict(c.fenced),
            "latency_s_p50": round(statistics.median([r["s"] for r in results]), 3) if results else None,
            "min_alive": min((a for _, a in series), default=0), "faults": out}


def plot(series: list[tuple[float, int]], faults: list[dict[str, Any]], t0: float, path: Path, nodes: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.step([t for t, _ in series], [a for _, a in series], where="post")
    for f in faults:
        ax.axvline(f["at"] - t0, color="red" if f["kind"] == "kill" else "orange", ls="--", lw=0.8)
    ax.set_ylim(-0.2, nodes + 0.5)
    ax.set_xlabel("seconds (dashed: red kill, orange pause)")
    ax.set_ylabel("nodes alive\n(not suspect)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
