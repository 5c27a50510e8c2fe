"""``lambdascale simulate`` (trace replay across systems) and ``lambdascale simulate scaling``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lambdascale.config import ConfigError, LambdaScaleConfig, add_config_args, config_from_args
from lambdascale.errors import LambdaScaleError

_RUN_FIELDS = ["cluster", "model", "catalogue", "model_run_length", "systems", "nodes", "gpus_per_node", "duration", "time_scale", "seed",
               "slo_ttft", "lengths_from", "min_instances", "target_concurrency", "keep_alive_s",
               "host_pool_gib", "host_cache_nodes", "keepalive_baseline_keep_alive_s", "max_batch",
               "max_prefill_tokens", "multicast_mode", "n_blocks", "n_chunks", "chunk_layout", "late_binding", "kick_from_zero",
               "pipeline_helper_blocks", "pipeline_microbatches", "pipeline_batch", "kv_move", "baseline_sources"]
_SCALING_FIELDS = ["cluster", "model", "systems", "nodes", "gpus_per_node", "multicast_mode", "n_blocks", "n_chunks",
                   "chunk_layout", "pipeline_helper_blocks", "pipeline_microbatches", "pipeline_batch",
                   "max_batch", "max_prefill_tokens", "kv_move", "baseline_sources"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate", help="trace-driven cluster simulation of λScale against its baselines",
        description="Replay a trace (or a synthetic workload) on a simulated cluster, once per system, "
                    "and print TTFT/TPOT percentiles, SLO attainment, GPU-seconds and scale events.")
    p.add_argument("--trace", help="trace file (normalized CSV, raw Azure CSV, Mooncake JSONL, requests-per-second "
                                   "series) or synthetic:NAME[,key=value...] (poisson, gamma, onoff, daily)")
    p.add_argument("--config", help="config file (YAML/JSON) whose sim.* and control.* sections apply")
    add_config_args(p, "sim", _RUN_FIELDS)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--plots", type=Path, help="write PNG plots (TTFT CDF, instances vs rate, a scale-out) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_simulate)
    sub = p.add_subparsers(dest="sim_command", metavar="MODE")
    s = sub.add_parser("scaling", help="simulate one scale-out alone and time it per system")
    s.add_argument("--config", help="config file (YAML/JSON)")
    add_config_args(s, "sim", _SCALING_FIELDS)
    s.add_argument("--sources", type=int, default=1, help="nodes that already hold the model (default: 1)")
    s.add_argument("--tier", choices=["gpu", "host", "ssd"], default="gpu", help="where the sources hold it (default: gpu)")
    s.add_argument("--burst", type=int, default=0,
                   help="requests arriving with the scale-out decision (as `bench scale` fires them); adds "
                        "TTFT p50/p99, the last first token and the last request done to the table (default: 0)")
    s.add_argument("--prompt-tokens", type=int, default=24, help="prompt tokens of every burst request (default: 24)")
    s.add_argument("--max-tokens", type=int, default=8, help="output tokens of every burst request (default: 8)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_scaling)


def _config(args: argparse.Namespace) -> LambdaScaleConfig:
    """The config tree; a bad file or value becomes a user error (printed without traceback)."""
    try:
        return config_from_args(args)
    except ConfigError as e:
        raise LambdaScaleError(str(e)) from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from lambdascale.sim.report import per_model, plot, summarize, table
    from lambdascale.sim.run import simulate, workload_for

    if not args.trace:
        raise LambdaScaleError("simulate needs --trace PATH|synthetic:NAME (or the 'scaling' mode)")
    cfg = _config(args)
    s = cfg.sim
    w = workload_for(s, args.trace)
    if len(w) == 0:
        raise LambdaScaleError(f"workload {args.trace} has no requests in the selected window")
    bar = None
    progress = None
    if not (args.json or args.no_progress):
        from tqdm import tqdm

        bar = tqdm(total=round(w.duration_s), unit="sim-s", file=sys.stderr, leave=False)

        def progress(name: str, t: float, horizon: float) -> None:
            bar.set_description(name)
            bar.n = min(bar.total, round(t))
            bar.refresh()

    t0 = time.perf_counter()
    results = simulate(s, w, cfg.control, progress=progress)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rows = [summarize(r, s.slo_ttft) for r in results]
    what = f"catalogue {s.catalogue}" if s.catalogue else s.model
    header = {"trace": args.trace, "requests": len(w), "duration_s": w.duration_s, "cluster": s.cluster,
              "model": s.model, "catalogue": s.catalogue, "nodes": s.nodes, "seed": s.seed,
              "slo_ttft_s": s.slo_ttft, "wall_s": wall}
    paths = plot(results, args.plots, s.slo_ttft, f"({what}, {s.nodes} nodes)") if args.plots else []
    if args.json:
        for row, r in zip(rows, results):
            row["per_model"] = per_model(r, s.slo_ttft)
            row["scale_event_list"] = [{**e.timeline.to_dict(), "algo": e.algo, "sources": e.n_sources,
                                        "network_targets": e.n_network, "local_tiers": e.tiers}
                                       for e in r.scale_events]
        print(json.dumps({**header, "systems": rows, "config": json.loads(cfg.model_dump_json()),
                          "plots": [str(p) for p in paths]}, indent=1, default=str))
        return 0
    print(f"{args.trace}: {len(w)} requests over {w.duration_s:.0f} s; {what} on {s.nodes} x {s.cluster}; "
          f"seed {s.seed}; simulated in {wall:.1f} s")
    print(table(rows, s.slo_ttft))
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_scaling(args: argparse.Namespace) -> int:
    from lambdascale.control.spec import Tier
    from lambdascale.sim.run import scaling_table
    from lambdascale.sim.scaling import Burst

    cfg = _config(args)
    s = cfg.sim
    if not 1 <= args.sources < s.nodes:
        raise LambdaScaleError(f"--sources must be in [1, --nodes - 1] = [1, {s.nodes - 1}], got {args.sources}")
    try:
        burst = Burst(args.burst, args.prompt_tokens, args.max_tokens)
    except ValueError:  # Burst checks its bounds; say them in the flags' names
        raise LambdaScaleError(f"--burst must be >= 0 and --prompt-tokens, --max-tokens >= 1; got {args.burst}, "
                               f"{args.prompt_tokens}, {args.max_tokens}") from None
    rows = scaling_table(s, [m.strip() for m in s.model.split(",")], s.nodes, args.sources, Tier(args.tier), cfg.control,
                         burst)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    print(f"one scale-out on {s.cluster}: {args.sources} source(s) holding it in {args.tier} -> {s.nodes} nodes serving"
          + (f"; a burst of {burst.requests} requests ({burst.prompt_tokens} prompt, {burst.max_tokens} output tokens) "
             f"arrives with it" if burst.requests else ""))
    extra = f"{'TTFT p50':>10}{'TTFT p99':>10}{'last first':>12}{'last done':>11}" if burst.requests else ""
    print(f"{'model':<12}{'system':<15}{'first serves':>13}{'all serve alone':>17}{extra}  how")
    for r in rows:
        cells = (f"{r.ttft_p50_s:>9.3f}s{r.ttft_p99_s:>9.3f}s{r.last_first_token_s:>11.3f}s{r.last_done_s:>10.3f}s"
                 if burst.requests else "")
        print(f"{r.model:<12}{r.system:<15}{r.first_serve_s:>12.3f}s{r.all_full_s:>16.3f}s{cells}  {r.how}")
    return 0
