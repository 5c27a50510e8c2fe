"""Simulator benchmark: λScale against its baselines (prints tables; writes plots with --plots).

Sections (each prints one table):

1. ``scaling``: one scale-out, Llama-2 7B/13B/70B, 1 -> 8 nodes on h800-ib400, every system.
2. ``code``: the Azure LLM 2023 code trace (bursty), Llama-2 13B, 8 and 16 nodes, all systems,
   in the serverless setting (scale to zero; host memory of only 2 nodes caches the model, the
   other nodes' pools are taken by other tenants) and with every node caching it in host memory.
3. ``frontier``: GPU-seconds at equal SLO: each system's cheapest (keep-alive, min-instances,
   target concurrency) setting whose SLO attainment reaches the target, on the code trace with 16
   nodes; keep-alive is swept per system (1-30 s), so each system is compared at its own best.
3c. ``hostcache``: λScale against ServerlessLLM as the number of nodes whose host memory may
   cache the model grows (the multi-tenant pressure knob), code trace, 16 nodes.
3b. ``gateway``: the simulated gateway's two mechanisms (late binding, scale-from-zero kick) on
   and off, every system, code trace, 16 nodes: what each contributes and to whom.
4. ``speed``: the whole Azure conv trace (19,366 requests) on 16 nodes with serverless-64, all five
   systems: wall and CPU time.
6. ``catalogue`` (issue 15): the defaults run (serverless-64 on the Azure code trace, 16 nodes),
   then a sensitivity table over the catalogue's size and host memory per node.
5. ``burst``: issue 6's acceptance shape, simulated (h200-ib400, Llama-2 7B, 6 nodes, 2 sources on
   GPU, a burst of 48 arriving with the scale-out; times x 100 to compare with the emulated
   cluster of ``bench scale --emulate-device h200:llama2-7b:100``): receivers only and with the
   sources lending, micro-batches per stage or one, and a 1 -> 2 scale-out with lending.

Usage: ``python bench/bench_sim.py --traces ../shared/traces [--sections scaling,code,frontier,speed] [--plots docs/img]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lambdascale.control.settings import ControlSettings
from lambdascale.control.snapshot import Tier
from lambdascale.sim.report import plot, summarize, table
from lambdascale.sim.run import scaling_table, simulate, workload_for
from lambdascale.sim.scaling import Burst
from lambdascale.sim.settings import SimSettings

SYSTEMS = "lambdascale,serverlessllm,faasnet,nccl,keepalive"
SERVERLESS = dict(min_instances=0, host_cache_nodes=2)


def section_scaling() -> None:
    for sources, tier in ((1, Tier.GPU), (4, Tier.GPU), (1, Tier.HOST)):
        rows = scaling_table(SimSettings(cluster="h800-ib400", systems=SYSTEMS, nodes=8),
                             ["llama2-7b", "llama2-13b", "llama2-70b"], 8, sources, tier)
        print(f"\n## scaling: one scale-out to 8 nodes on h800-ib400, {sources} source(s) holding the model in {tier.value}")
        print(f"{'model':<12}{'system':<15}{'first serves':>13}{'all serve alone':>17}  how")
        for r in rows:
            print(f"{r.model:<12}{r.system:<15}{r.first_serve_s:>12.3f}s{r.all_full_s:>16.3f}s  {r.how}")


def _ratios(rows: list[dict]) -> str:
    lam = next(r for r in rows if r["system"] == "lambdascale")
    base = [r for r in rows if r["system"] != "lambdascale"]
    parts = [f"{r['system']} p99 TTFT x{r['ttft_p99_s'] / lam['ttft_p99_s']:.2f}, GPU-s {100 * (1 - lam['gpu_seconds'] / r['gpu_seconds']):+.1f}% saved"
             for r in base]
    return "λScale vs: " + "; ".join(parts)


def section_code(traces: Path, plots: Path | None) -> None:
    trace = str(traces / "normalized" / "azure_llm_2023_code.csv")
    for label, extra in (("serverless: scale to zero, host cache on 2 nodes", SERVERLESS),
                         ("every node caches the model in host memory, 1 warm instance", dict(min_instances=1))):
        for nodes in (8, 16):
            s = SimSettings(model="llama2-13b", cluster="h800-ib400", nodes=nodes, systems=SYSTEMS, **extra)
            t0 = time.perf_counter()
            res = simulate(s, trace)
            wall = time.perf_counter() - t0
            rows = [summarize(r, s.slo_ttft) for r in res]
            print(f"\n## code trace, llama2-13b, {nodes} x h800-ib400, {label} (SLO TTFT <= {s.slo_ttft} s; {wall:.1f} s wall)")
            print(table(rows, s.slo_ttft))
            print(_ratios(rows))
            if plots is not None and nodes == 16 and extra is SERVERLESS:
                for p in plot(res, plots, s.slo_ttft, "(code trace, 13B, 16 nodes)"):
                    print(f"wrote {p}")


def section_frontier(traces: Path, target: float, p99_bound: float) -> None:
    trace = str(traces / "normalized" / "azure_llm_2023_code.csv")
    base = SimSettings(model="llama2-13b", cluster="h800-ib400", nodes=16, systems=SYSTEMS, host_cache_nodes=2)
    w = workload_for(base, trace)
    # The same grid for every system: scale to zero with keep-alive 2-30 s, or one warm instance,
    # times the autoscaler's target concurrency. The scale-down cooldown follows a short keep-alive
    # (min(10 s, keep-alive)): otherwise the 10 s default cooldown, not the keep-alive, decides when
    # the last instance goes. With a warm floor (min=1) keep-alive no longer matters. Each system's
    # cheapest row meeting a criterion is its own best setting.
    kas = (2.0, 5.0, 10.0, 30.0)
    grid = [(m, ka, tc) for m, ka in [(0, k) for k in kas] + [(1, 30.0)] for tc in (4, 8, 12, 16, 24, 32)]
    rows: list[tuple[str, float, float, float, str]] = []  # system, GPU-s, SLO, p99, setting
    print("\n## frontier grid (code trace, 13B, 16 nodes, host cache on 2 nodes)")
    print(f"{'system':<14}{'min':>4}{'keep-alive':>11}{'cooldown':>9}{'target':>7}{'SLO':>8}{'p99 TTFT':>10}{'GPU-s':>9}")
    for m, ka, tc in grid:
        s = base.model_copy(update={"min_instances": m, "keep_alive_s": ka, "keepalive_baseline_keep_alive_s": 10 * ka,
                                    "target_concurrency": tc})
        cool = min(10.0, ka)
        for r in simulate(s, w, ControlSettings(scale_down_cooldown_s=cool)):
            row = summarize(r, s.slo_ttft)
            ka_eff = s.keepalive_baseline_keep_alive_s if r.system == "keepalive" else ka
            print(f"{r.system:<14}{m:>4}{ka_eff:>10.0f}s{cool:>8.0f}s{tc:>7d}{row['slo_attainment']:>8.1%}"
                  f"{row['ttft_p99_s']:>9.2f}s{row['gpu_seconds']:>9.0f}")
            rows.append((r.system, row["gpu_seconds"], row["slo_attainment"], row["ttft_p99_s"],
                         f"min={m} keep-alive={ka_eff:.0f}s cooldown={cool:.0f}s target={tc}"))
    for label, ok in ((f"SLO attainment >= {target:.1%}", lambda r: r[2] >= target),
                      (f"p99 TTFT <= {p99_bound:.2f} s", lambda r: r[3] <= p99_bound)):
        best: dict[str, tuple[str, float, float, float, str]] = {}
        for r in rows:
            if ok(r) and (r[0] not in best or r[1] < best[r[0]][1]):
                best[r[0]] = r
        print(f"cheapest per system with {label}:")
        for name, (_, g, slo, p99, how) in sorted(best.items(), key=lambda kv: kv[1][1]):
            print(f"  {name:<14}{g:>8.0f} GPU-s  SLO {slo:.1%}  p99 {p99:.2f}s  ({how})")
        others = [v[1] for k, v in best.items() if k != "lambdascale"]
        if "lambdascale" in best and others:
            print(f"  λScale saves {100 * (1 - best['lambdascale'][1] / min(others)):.1f}% GPU-s against the best baseline")


def section_gateway(traces: Path) -> None:
    trace = str(traces / "normalized" / "azure_llm_2023_code.csv")
    base = SimSettings(model="llama2-13b", cluster="h800-ib400", nodes=16, systems=SYSTEMS, **SERVERLESS)
    w = workload_for(base, trace)
    print("\n## gateway mechanisms, every system (code trace, 13B, 16 nodes, scale to zero, host cache on 2 nodes)")
    print(f"{'late binding':<13}{'kick':<6}" + "".join(f"{n:>15}" for n in SYSTEMS.split(",")) + "   (p99 TTFT s / GPU-s)")
    for late, kick in ((False, False), (True, False), (False, True), (True, True)):
        s = base.model_copy(update={"late_binding": late, "kick_from_zero": kick})
        rows = {r.system: summarize(r, s.slo_ttft) for r in simulate(s, w)}
        cells = "".join(f"{rows[n]['ttft_p99_s']:>8.3f}/{rows[n]['gpu_seconds']:>6.0f}" for n in SYSTEMS.split(","))
        print(f"{'on' if late else 'off':<13}{'on' if kick else 'off':<6}{cells}")


def section_hostcache(traces: Path) -> None:
    trace = str(traces / "normalized" / "azure_llm_2023_code.csv")
    base = SimSettings(model="llama2-13b", cluster="h800-ib400", nodes=16, systems="lambdascale,serverlessllm", min_instances=0)
    w = workload_for(base, trace)
    print("\n## sensitivity: nodes whose host memory may cache the model (code trace, 13B, 16 nodes, scale to zero)")
    print(f"{'host-cache nodes':>17}{'λScale p99':>12}{'SLLM p99':>10}{'ratio':>7}{'λScale GPU-s':>14}{'SLLM GPU-s':>12}")
    for hc in (1, 2, 4, 8, 16):
        s = base.model_copy(update={"host_cache_nodes": hc})
        lam, sl = (summarize(r, s.slo_ttft) for r in simulate(s, w))
        print(f"{hc:>17}{lam['ttft_p99_s']:>11.3f}s{sl['ttft_p99_s']:>9.3f}s{sl['ttft_p99_s'] / lam['ttft_p99_s']:>6.2f}x"
              f"{lam['gpu_seconds']:>14.0f}{sl['gpu_seconds']:>12.0f}")


def section_speed(traces: Path) -> None:
    import resource

    trace = str(traces / "normalized" / "azure_llm_2023_conv.csv")
    s = SimSettings(catalogue="serverless-64", cluster="h800-ib400", nodes=16, systems=SYSTEMS)
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    res = simulate(s, trace)
    wall = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - c0
    print(f"(CPU time {cpu:.1f} s; a shared machine's wall time counts other jobs too)")
    rows = [summarize(r, s.slo_ttft) for r in res]
    print(f"\n## speed: Azure conv trace, {len(res[0].ttft)} requests, serverless-64, 16 nodes, all five systems: {wall:.1f} s wall "
          f"({sum(r.events for r in res)} events)")
    print(table(rows, s.slo_ttft))


def _sub_catalogue(n: int, out: Path) -> str:
    """The ``n`` most popular models of serverless-64 as a catalogue file (its own weights)."""
    from lambdascale.sim.catalogue import load_catalogue

    cat = load_catalogue("serverless-64")
    rows = sorted(cat.models, key=lambda m: -m.weight)[:n]
    p = out / f"serverless-64-top{n}.csv"
    p.write_text("name,shape,gpus,weight\n" + "".join(f"{m.name},{m.shape},,{m.weight}\n" for m in rows))
    return str(p)


def section_catalogue(traces: Path, plots: Path | None) -> None:
    """Issue 15: the defaults run (serverless-64, Azure code, 16 nodes), then what moves it: the
    catalogue's size (its most popular n models, finetunes-256) and host memory per node."""
    import tempfile

    trace = str(traces / "normalized" / "azure_llm_2023_code.csv")
    base = SimSettings(catalogue="serverless-64", nodes=16, systems=SYSTEMS)
    t0 = time.perf_counter()
    res = simulate(base, trace)
    rows = [summarize(r, base.slo_ttft) for r in res]
    print(f"\n## catalogue: defaults (serverless-64, Azure code, 16 x h800-ib400), {time.perf_counter() - t0:.1f} s wall")
    print(table(rows, base.slo_ttft))
    print(_ratios(rows))
    for r in rows:
        print(f"  {r['system']:<14} starts {r['starts_by_tier']} evictions {r['evictions']} "
              f"host {r['host_occupancy_mean']:.2f} GPUs {r['gpu_occupancy_mean']:.2f}")
    if plots is not None:
        plot(res, plots / "catalogue", base.slo_ttft, "(serverless-64, code trace, 16 nodes)")
    print("\n## catalogue sensitivity: λScale vs the best baseline (ServerlessLLM) and FaaSNet, code trace, 16 nodes")
    print(f"{'catalogue':<22}{'host GiB':>9}{'λS p99':>9}{'SLLM p99':>9}{'FaaSNet':>9}{'x SLLM':>8}{'x FaaSNet':>10}"
          f"{'λS GPU-s':>10}{'SLLM GPU-s':>11}{'λS SLO':>8}{'SLLM SLO':>9}{'λS net starts':>14}")
    with tempfile.TemporaryDirectory() as d:
        cases = [("llama2-13b alone", None, 1024.0)] + [(f"serverless-64 top {n}", _sub_catalogue(n, Path(d)), 1024.0)
                                                        for n in (8, 16, 32)]
        cases += [("serverless-64", "serverless-64", h) for h in (1024.0, 512.0, 256.0, 128.0)]
        cases += [("finetunes-256", "finetunes-256", 1024.0)]
        for label, cat, host in cases:
            s = base.model_copy(update={"catalogue": cat, "host_pool_gib": host,
                                        "systems": "lambdascale,serverlessllm,faasnet"})
            lam, sl, fa = (summarize(r, s.slo_ttft) for r in simulate(s, trace))
            print(f"{label:<22}{host:>9.0f}{lam['ttft_p99_s']:>9.2f}{sl['ttft_p99_s']:>9.2f}{fa['ttft_p99_s']:>9.2f}"
                  f"{sl['ttft_p99_s'] / lam['ttft_p99_s']:>8.2f}{fa['ttft_p99_s'] / lam['ttft_p99_s']:>10.2f}"
                  f"{lam['gpu_seconds']:>10.0f}{sl['gpu_seconds']:>11.0f}{lam['slo_attainment']:>8.3f}"
                  f"{sl['slo_attainment']:>9.3f}{lam['starts_by_tier'].get('network', 0):>14}", flush=True)


def section_burst() -> None:
    print("\n## burst: one scale-out with a burst arriving with it (h200-ib400, llama2-7b, chunk-level multicast, "
          "8 sequences per instance); seconds x 100")
    print(f"{'nodes':>5} {'src':>3} {'burst':>5} {'prompt':>6} {'lend':>4} {'microb':>6} {'1st pipe':>9} {'all solo':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'last done':>10}")
    cases = [(6, 2, 48, 24, lend, mb) for lend in (0, 2) for mb in (0, 1)]
    cases += [(6, 2, 48, 256, 0, mb) for mb in (0, 1)] + [(2, 1, 24, 24, lend, 0) for lend in (0, 2, 8)]
    for nodes, src, n, prompt, lend, mb in cases:
        s = SimSettings(cluster="h200-ib400", systems="lambdascale", nodes=nodes, max_batch=8, multicast_mode="chunk",
                        pipeline_helper_blocks=lend, pipeline_microbatches=mb)
        (r,) = scaling_table(s, ["llama2-7b"], nodes, src, Tier.GPU, burst=Burst(n, prompt, 8))
        pipe = f"{100 * r.first_serve_s:9.2f}" if r.first_serve_s < r.all_full_s else f"{'none':>9}"
        print(f"{nodes:>5} {src:>3} {n:>5} {prompt:>6} {lend:>4} {mb or 'stage':>6} {pipe} {100 * r.all_full_s:9.2f} "
              f"{100 * r.ttft_p50_s:9.2f} {100 * r.ttft_p99_s:9.2f} {100 * r.last_done_s:10.2f}")
    print("baselines, 6 nodes, 2 sources, burst 48 x 24 tokens (one root / one tree or ring per holder):")
    for bs in (1, 2):
        s = SimSettings(cluster="h200-ib400", systems="faasnet,nccl", nodes=6, max_batch=8, multicast_mode="chunk",
                        baseline_sources=bs)
        for r in scaling_table(s, ["llama2-7b"], 6, 2, Tier.GPU, burst=Burst(48, 24, 8)):
            print(f"  {r.system:<8} {r.how:<20} all solo {100 * r.all_full_s:6.2f}  TTFT p50 {100 * r.ttft_p50_s:6.2f}  "
                  f"p99 {100 * r.ttft_p99_s:6.2f}  last done {100 * r.last_done_s:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "traces")
    ap.add_argument("--sections", default="scaling,catalogue,code,gateway,hostcache,frontier,speed,burst")
    ap.add_argument("--plots", type=Path, default=None, help="write PNGs of the 16-node code-trace run here")
    ap.add_argument("--slo-target", type=float, default=0.99, help="SLO attainment the frontier must reach")
    ap.add_argument("--p99-bound", type=float, default=1.0, help="p99 TTFT bound of the frontier's second criterion")
    a = ap.parse_args()
    sections = a.sections.split(",")
    if "scaling" in sections:
        section_scaling()
    if "catalogue" in sections:
        section_catalogue(a.traces, a.plots)
    if "code" in sections:
        section_code(a.traces, a.plots)
    if "gateway" in sections:
        section_gateway(a.traces)
    if "hostcache" in sections:
        section_hostcache(a.traces)
    if "frontier" in sections:
        section_frontier(a.traces, a.slo_target, a.p99_bound)
    if "speed" in sections:
        section_speed(a.traces)
    if "burst" in sections:
        section_burst()


if __name__ == "__main__":
    main()
