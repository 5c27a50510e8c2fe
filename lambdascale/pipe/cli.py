"""``lambdascale plan multicast|pipelines``: print a multicast schedule or the pipelines it lets
form, tick by tick. ``--json`` prints the stable documents described in docs/plan-json.md."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

_PIPE_FLAGS = ["algo", "blocks", "chunks", "gpus_per_node", "nics_per_node", "nic_gbps", "latency_us", "intra_gbps"]


def register(subparsers: Any) -> None:
    from lambdascale.config import add_config_args

    plan = subparsers.add_parser("plan", help="plan a multicast or the execution pipelines it enables (pure, offline)")
    sub = plan.add_subparsers(dest="plan_command", required=True, metavar="WHAT")
    for name, helptext in (
        ("multicast", "print the rounds, block ticks, first pipeline and completion of a multicast"),
        ("pipelines", "print the execution pipelines formed tick by tick during a multicast"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--nodes", type=int, required=True, help="nodes in total, sources included")
        p.add_argument("--sources", type=int, default=1, help="number of source nodes (nodes 0..S-1) (default: 1)")
        p.add_argument("--config", default=None, help="config file (YAML/JSON) whose pipe section supplies defaults")
        add_config_args(p, "pipe", _PIPE_FLAGS)
        p.add_argument("--chunk-mib", type=float, default=None,
                       help="also replay the plan with the player (round and chunk modes) for chunks of this size")
        p.add_argument("--json", action="store_true", help="print the JSON document (docs/plan-json.md)")
        if name == "multicast":
            p.add_argument("--no-rounds", action="store_true", help="omit the per-round sends")
        p.set_defaults(func=_cmd_plan, plan_kind=name)


def _build(args: argparse.Namespace):
    from lambdascale.config import ConfigError, config_from_args
    from lambdascale.pipe.multicast import plan_multicast
    from lambdascale.pipe.multicast_plan import PlanError

    try:
        cfg = config_from_args(args).pipe
    except ConfigError as e:
        raise PlanError(str(e)) from None
    plan = plan_multicast(cfg.algo, args.nodes, args.sources, cfg.blocks, cfg.chunks, cfg.gpus_per_node, cfg.nics_per_node)
    return cfg, plan


def _player_json(plan: Any, cfg: Any, chunk_mib: float) -> dict[str, Any]:
    from lambdascale.pipe.player import Links, PlayMode, play

    links = Links(
        nic_send_bps=cfg.nic_gbps * 1e9 / 8,
        nic_recv_bps=cfg.nic_gbps * 1e9 / 8,
        latency_s=cfg.latency_us * 1e-6,
        intra_bps=cfg.intra_gbps * 1e9 / 8,
    )
    out: dict[str, Any] = {"chunk_bytes": int(chunk_mib * 2**20), "nic_gbps": cfg.nic_gbps, "latency_us": cfg.latency_us}
    for mode in PlayMode:
        r = play(plan, chunk_mib * 2**20, links, mode)
        out[mode.value] = {
            "all_blocks_s": r.all_blocks_time,
            "first_pipeline_s": r.first_pipeline_time if r.first_pipeline_time != float("inf") else None,
            "completion_s": r.completion_time,
        }
    return out


def _cmd_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from lambdascale.pipe.report import multicast_json, pipelines_json

    out = out or sys.stdout
    cfg, plan = _build(args)
    if args.plan_kind == "multicast":
        doc = multicast_json(plan, with_rounds=not getattr(args, "no_rounds", False))
    else:
        doc = pipelines_json(plan)
    if args.chunk_mib is not None:
        from lambdascale.pipe.multicast_plan import PlanError

        if not args.chunk_mib > 0:
            raise PlanError(f"--chunk-mib must be > 0, got {args.chunk_mib}")
        doc["player"] = _player_json(plan, cfg, args.chunk_mib)
    if args.json:
        json.dump(doc, out, indent=1)
        out.write("\n")
        return 0
    _print_text(doc, out)
    return 0


def _fmt_pipe(p: dict[str, Any]) -> str:
    return " -> ".join(f"n{s['node']}[{s['start']}:{s['end']})" for s in p["stages"])


def _print_text(doc: dict[str, Any], out: TextIO) -> None:
    w = out.write
    w(f"{doc['kind']}: algo={doc['algo']} nodes={doc['nodes']} sources={doc['sources']} "
      f"blocks={doc['blocks']} chunks={doc['chunks']} gpus/node={doc['gpus_per_node']} nics/node={doc['nics_per_node']}\n")
    if doc["kind"] == "multicast":
        for t, rnd in enumerate(doc.get("rounds", []), start=1):
            sends = " ".join(f"{s}->{d}:{c}" + ("" if k == "network" else "(i)") for s, d, c, k in rnd)
            w(f"round {t:4d}: {sends}\n")
        w(f"every block whole on some receiver at tick {doc['all_blocks_tick']}\n")
        w(f"first pipeline at tick {doc['first_pipeline_tick']}; first serving instance at tick {doc['first_serving_tick']}\n")
        w(f"completion at tick {doc['completion_tick']}\n")
    else:
        w(f"planned sizes {doc['planned_sizes']}\n")
        for t in doc["ticks"]:
            w(f"tick {t['tick']:4d}: instances={t['instances']} solo={t['solo']}\n")
            for p in t["form"]:
                w(f"    form     {_fmt_pipe(p)}\n")
            for p in t["dissolve"]:
                w(f"    dissolve {_fmt_pipe(p)}\n")
        w(f"completion at tick {doc['completion_tick']}\n")
    if "player" in doc:
        pl = doc["player"]
        w(f"player ({pl['chunk_bytes']} B chunks, {pl['nic_gbps']} Gbit/s, {pl['latency_us']} us):\n")
        for mode in ("round", "chunk"):
            r = pl[mode]
            w(f"  {mode:5s}: all blocks {r['all_blocks_s']:.6f} s, first pipeline {r['first_pipeline_s']}, "
              f"completion {r['completion_s']:.6f} s\n")
