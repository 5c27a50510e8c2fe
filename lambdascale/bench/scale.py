"""``lambdascale bench scale``: scale-out on real agent processes over 127.0.0.1.

What it measures today (the data-plane part of issue 6):

1. **Capped multicast vs its bound.** Sources load the model from their SSD tier (``--ssd-gbps``
   cap), then multicast it to every other node over links capped at ``--link-gbps``. The bound
   for one binomial group of n nodes (source included) and k chunks is
   ``(k - 1 + ceil(log2 n)) / k x model_bytes / link_rate``; with S sources each group has its
   own bound and the slowest group counts.
2. **Uncapped efficiency.** In the same run, on a second, uncapped cluster: point-to-point
   throughput (one source, one receiver, the same executor) against each receiver's throughput
   in a full multicast (model bytes / time until that receiver held everything). Goal >= 70%.

3. **Systems under a burst.** For each of lambdascale (multicast + execute-while-load), faasnet
   (tree multicast, serve when full), nccl (ring, serve when full) and local (every node loads
   from its own SSD tier), on a fresh capped cluster: a burst of ``--burst`` requests fired as the
   scale-out starts; TTFT p50/p99, when the last request got its first token, when every node
   serves alone, bytes moved, and whether every output equals a single-node run (same seeds).
   ``--batch-invariant`` runs every system's stages and that single-node reference with
   ``engine.batch_invariant`` (the table states the numerics), which makes "exact" hold bitwise
   where the default numerics depend on batch composition (large vocabularies, bfloat16).

``--emulate-device CALIBRATION:MODEL[:SCALE]`` makes every stage step last at least the calibrated
GPU time (:mod:`lambdascale.runtime.emulation`); without it agents compute on the shared CPU cores
and more nodes add no compute capacity.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from lambdascale.errors import LambdaScaleError
from lambdascale.model.manifest import Manifest, read_manifest
from lambdascale.pipe.multicast import Algo
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import DropModel, HoldModel
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.ratelimit import gbps_to_bytes_per_s
from lambdascale.transfer.settings import TransferSettings


@dataclass
class ScaleBenchResult:
    """Everything ``bench scale`` reports (the ``--json`` document)."""

    model: str
    model_bytes: int
    n_chunks: int
    n_blocks: int
    nodes: int
    sources: int
    transport: str
    link_gbps: float | None
    ssd_gbps: float | None
    source_load_s: float
    multicast_s: float
    bound_s: float | None
    vs_bound: float | None
    p2p_gbps: float
    multicast_receiver_gbps: list[float] = field(default_factory=list)
    efficiency: float = 0.0
    #: sum of receivers' rates / p2p: on one shared CPU every agent competes for the same cores,
    #: so this, not the per-receiver ratio, shows whether the multicast path itself is efficient
    aggregate_efficiency: float = 0.0
    systems: list[dict[str, Any]] = field(default_factory=list)
    emulate_device: str | None = None
    #: with ``sources > 1``: a capped multicast from node 0 alone, in the same run, and its bound
    single_source_multicast_s: float | None = None
    single_source_bound_s: float | None = None
    single_source_vs_bound: float | None = None
    #: ``--also-without-emulation``: the same burst on fresh clusters with real CPU time only
    systems_without_emulation: list[dict[str, Any]] = field(default_factory=list)
    #: the plan replayed (pipe.player, chunk mode) with the model's real, unequal chunk sizes at the
    #: link cap: the best this schedule can do; the formula bound assumes equal chunks
    plan_play_s: float | None = None
    single_source_plan_play_s: float | None = None
    stage_dtype: str = "float32"
    #: engine.batch_invariant on every stage and on the single-node reference (``--batch-invariant``)
    batch_invariant: bool = False
    device_arena_gb: float = 0.0  # resident landing-zone memory per agent (runtime.device_arena_gb)
    #: blocks each source may run as stages of execute-while-load pipelines (runtime.pipeline_helper_blocks)
    pipeline_helper_blocks: int = 0


def multicast_bound_s(n_nodes: int, n_sources: int, k: int, model_bytes: int, link_bps: float) -> float:
    """Lower bound of a (multi-source) binomial multicast: the slowest group's (k-1+ceil(log2 n_g))/k."""
    receivers = n_nodes - n_sources
    groups = max(1, min(n_sources, receivers))
    largest = math.ceil(receivers / groups) + 1  # group members plus its source
    return (k - 1 + math.ceil(math.log2(largest))) / k * model_bytes / link_bps


def plan_play_s(manifest: Manifest, n_nodes: int, n_sources: int, algo: Algo, link_bps: float) -> float:
    """Completion of the planner's schedule replayed with each chunk's real size at ``link_bps``.

    With format-2 checkpoints chunks are equal-byte ranges of the model's stream, so this equals
    the formula up to rounding; a version-1 checkpoint (chunks tiling layer-cut blocks) can have
    chunks several times larger than others, and then the formula understates what any schedule
    of those chunks can reach.
    """
    from lambdascale.pipe.multicast import plan_multicast
    from lambdascale.pipe.player import Links, play

    sizes = [float(n) for n in manifest.chunk_lengths()]
    plan = plan_multicast(algo.value, n_nodes, n_sources, manifest.n_blocks, manifest.n_chunks, layout=manifest.layout)
    res = play(plan, sizes, Links(nic_send_bps=link_bps, nic_recv_bps=link_bps, latency_s=0.0), mode="chunk")
    return max((max(v) for v in res.chunk_arrival.values() if v), default=0.0)


def resolve_model(spec: str, models_dir: Path, layers: int | None, blocks: int, chunks_per_block: int) -> Path:
    """A model directory for ``spec``: an existing model name, or ``synthetic:SHAPE`` imported once."""
    from lambdascale.model.checkpoint import find_model
    from lambdascale.model.importers import import_model

    if spec.startswith("synthetic:"):
        return import_model(spec, models_dir, layers=layers, n_blocks=blocks, chunks_per_block=chunks_per_block).dir
    return find_model(models_dir, spec).dir


async def _one_multicast(lc: LocalCluster, model_dir: Path, manifest: Manifest, sources: list[int],
                         receivers: list[int], algo: Algo) -> tuple[float, Any]:
    t0 = asyncio.get_running_loop().time()
    # sources load in parallel (each has its own SSD cap), as they would on separate nodes
    await asyncio.gather(*(lc.cluster.request(s, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False)) for s in sources))
    load_s = asyncio.get_running_loop().time() - t0
    await prepare_receivers(lc.cluster, manifest, receivers, model_dir)
    res = await run_multicast(lc.cluster, manifest, sources, receivers, algo)
    return load_s, res


async def run_scale_bench(
    model_dir: Path, nodes: int, sources: int, transfer: TransferSettings, runtime: RuntimeSettings,
    algo: Algo = Algo.BINOMIAL,
) -> ScaleBenchResult:

    if not 1 <= sources < nodes:
        raise LambdaScaleError(f"--sources must be in [1, nodes-1] = [1, {nodes - 1}], got {sources}")
    manifest = read_manifest(model_dir)
    src = list(range(sources))
    rcv = list(range(sources, nodes))
    # 1. capped run
    single = None
    async with LocalCluster(nodes, transfer, runtime) as lc:
        load_s, res = await _one_multicast(lc, model_dir, manifest, src, rcv, algo)
        if sources > 1:  # the single-source figure side by side: node 0 alone to every other node
            others = list(range(1, nodes))
            await asyncio.gather(*(lc.cluster.request(n, DropModel(req=0, model=manifest.name)) for n in others))
            await prepare_receivers(lc.cluster, manifest, others, model_dir)
            single = await run_multicast(lc.cluster, manifest, [0], others, algo)
    bound = single_bound = None
    if transfer.link_gbps:
        link_bps = gbps_to_bytes_per_s(transfer.link_gbps)
        bound = multicast_bound_s(nodes, sources, manifest.n_chunks, manifest.total_bytes, link_bps)
        single_bound = multicast_bound_s(nodes, 1, manifest.n_chunks, manifest.total_bytes, link_bps)
        played: float | None = plan_play_s(manifest, nodes, sources, algo, link_bps)
        single_played = plan_play_s(manifest, nodes, 1, algo, link_bps) if single else None
    else:
        played = single_played = None
    # 2. uncapped: point-to-point, then a full multicast, on one cluster
    free = transfer.model_copy(update={"link_gbps": None, "ssd_gbps": None})
    async with LocalCluster(nodes, free, runtime) as lc:
        _, p2p = await _one_multicast(lc, model_dir, manifest, [0], [1], Algo.DIRECT)
        await lc.cluster.request(1, DropModel(req=0, model=manifest.name))
        await prepare_receivers(lc.cluster, manifest, list(range(1, nodes)), model_dir)
        mc = await run_multicast(lc.cluster, manifest, [0], list(range(1, nodes)), algo)
    gbps = lambda s: manifest.total_bytes * 8 / s / 1e9  # noqa: E731
    p2p_gbps = gbps(p2p.completion_s)
    per_rcv = [gbps(t) for _, t in sorted(mc.node_full_s.items())]
    return ScaleBenchResult(
        model=manifest.name, model_bytes=manifest.total_bytes, n_chunks=manifest.n_chunks, n_blocks=manifest.n_blocks,
        nodes=nodes, sources=sources, transport=transfer.backend, link_gbps=transfer.link_gbps,
        ssd_gbps=transfer.ssd_gbps, source_load_s=load_s, multicast_s=res.completion_s, bound_s=bound,
        vs_bound=(res.completion_s / bound) if bound else None, p2p_gbps=p2p_gbps,
        multicast_receiver_gbps=per_rcv, efficiency=statistics.mean(per_rcv) / p2p_gbps,
        aggregate_efficiency=sum(per_rcv) / p2p_gbps,
        single_source_multicast_s=single.completion_s if single else None,
        single_source_bound_s=single_bound if single else None,
        single_source_vs_bound=(single.completion_s / single_bound) if single and single_bound else None,
        plan_play_s=played, single_source_plan_play_s=single_played,
    )


def write_result(r: ScaleBenchResult, path: Path) -> None:
    """``r`` as JSON in ``path``, replaced atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(r), indent=2))
    os.replace(tmp, path)


def format_table(r: ScaleBenchResult) -> str:
    rows = [
        ("model", f"{r.model} ({r.model_bytes / 2**20:.1f} MiB, {r.n_blocks} blocks, {r.n_chunks} chunks)"),
        ("cluster", f"{r.nodes} agents, {r.sources} source(s), transport {r.transport}"),
        ("caps", f"link {r.link_gbps or 'none'} Gbit/s, ssd {r.ssd_gbps or 'none'} Gbit/s"),
        ("landing zones", f"resident arena of {r.device_arena_gb:.2f} GB per agent" if r.device_arena_gb
         else "fresh buffers touched during the scale-out"),
        ("sources' stages in pipelines", f"up to {r.pipeline_helper_blocks} blocks each" if r.pipeline_helper_blocks
         else "none (receivers only)"),
        ("source load from SSD tier", f"{r.source_load_s * 1e3:.1f} ms"),
        ("multicast completion (capped)", f"{r.multicast_s * 1e3:.1f} ms"),
        ("bound (k-1+ceil(log2 n))/k x size/link", f"{r.bound_s * 1e3:.1f} ms" if r.bound_s else "n/a (no link cap)"),
        ("completion / bound (goal <= 1.25)", f"{r.vs_bound:.2f}" if r.vs_bound else "n/a"),
        ("plan replayed with real chunk sizes", f"{r.plan_play_s * 1e3:.1f} ms (completion / it: "
         f"{r.multicast_s / r.plan_play_s:.2f})" if r.plan_play_s else "n/a"),
    ]
    if r.single_source_multicast_s is not None:
        rows += [
            ("1-source multicast completion (capped)", f"{r.single_source_multicast_s * 1e3:.1f} ms"),
            ("1-source bound", f"{r.single_source_bound_s * 1e3:.1f} ms" if r.single_source_bound_s else "n/a"),
            ("1-source completion / bound (goal <= 1.25)",
             f"{r.single_source_vs_bound:.2f}" if r.single_source_vs_bound else "n/a"),
            ("1-source plan replayed with real chunk sizes",
             f"{r.single_source_plan_play_s * 1e3:.1f} ms (completion / it: "
             f"{r.single_source_multicast_s / r.single_source_plan_play_s:.2f})" if r.single_source_plan_play_s else "n/a"),
        ]
    rows += [
        ("uncapped point-to-point", f"{r.p2p_gbps:.2f} Gbit/s"),
        ("uncapped multicast per receiver", ", ".join(f"{g:.2f}" for g in r.multicast_receiver_gbps) + " Gbit/s"),
        ("multicast / p2p (goal >= 0.70)", f"{r.efficiency:.2f}"),
        ("sum over receivers / p2p (shared CPU)", f"{r.aggregate_efficiency:.2f}"),
    ]
    w = max(len(k) for k, _ in rows)
    out = "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
    for label, systems in ((r.emulate_device or "off", r.systems), ("off", r.systems_without_emulation)):
        if systems:
            numerics = "batch-invariant" if r.batch_invariant else "default"
            out += f"\n\nburst served during scale-out (emulate-device: {label}, stages {r.stage_dtype}, " \
                f"numerics {numerics})\n" \
                + _systems_table(systems)
    return out


def _systems_table(systems: list[dict[str, Any]]) -> str:
    """One row per system plus lambdascale's p99 TTFT over each other system's (goal: <= 0.5 vs
    faasnet and nccl, < 1 vs local)."""
    hdr = f"{'system':12} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'last 1st tok ms':>15} {'last done ms':>12} " \
          f"{'all solo ms':>11} {'MiB moved':>9} {'pipes':>5} {'exact':>5} {'ls p99 / this':>13}"
    ls = next((x["ttft_p99_s"] for x in systems if x["system"] == "lambdascale" and not x.get("failed")), None)
    lines = [hdr]
    for x in systems:
        if x.get("failed"):
            lines.append(f"{x['system']:12} FAILED: {x['error']}")
            continue
        ratio = f"{ls / x['ttft_p99_s']:.2f}" if ls is not None and x["ttft_p99_s"] > 0 else "n/a"
        lines.append(f"{x['system']:12} {x['ttft_p50_s'] * 1e3:>11.1f} {x['ttft_p99_s'] * 1e3:>11.1f} "
                     f"{x['last_first_token_s'] * 1e3:>15.1f} {x.get('last_done_s', 0.0) * 1e3:>12.1f} "
                     f"{x['all_solo_s'] * 1e3:>11.1f} "
                     f"{x['bytes_moved'] / 2**20:>9.1f} {x['pipelines_formed']:>5} {str(x['exact']):>5} {ratio:>13}")
    return "\n".join(lines)


def _progress(msg: str) -> None:
    """A timestamped line on stderr: long runs (minutes per system) show where they are."""
    import sys
    import time

    print(f"[bench scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    i = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[i]


def make_burst(n: int, vocab: int, max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """``n`` requests with seeded random prompts of 16-32 tokens, alternating greedy and sampled."""
    import random

    from lambdascale.engine.sampling import SamplingParams
    from lambdascale.engine.sequence import TokenState

    rng = random.Random(seed)
    out = {}
    for i in range(n):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(16, 32)))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if i % 2 else 0.8, top_p=0.95, ignore_eos=True)
        out[f"r{i}"] = TokenState(prompt, (), params, seed * 1000 + i)
    return out


def reference_outputs(model_dir: Path, burst: dict[str, Any], device: str = "cpu",
                      dtype: Literal["float32", "bfloat16"] = "float32", batch_invariant: bool = False,
                      max_step_tokens: int = 512,
                      max_seqs: int = 8) -> dict[str, list[int]]:
    """Each request alone on an in-process single-node engine (the exactness reference).

    ``dtype`` on ``device``, the same as the agents' stages (``--stage-dtype``). With
    ``batch_invariant`` the reference runs the same numerics as the agents, and its step budget
    (``max_step_tokens``, ``max_seqs``) gives the same prefill chunks as their pipelines'.
    """
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.settings import EngineSettings

    eng = Engine.from_checkpoint(model_dir, EngineSettings(
        device="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, batch_invariant=batch_invariant,
        max_num_batched_tokens=max_step_tokens, max_batch_size=max_seqs))
    return {rid: [t for o in eng.stream(eng.resume(st, request_id=rid)) for t in o.token_ids] for rid, st in burst.items()}


async def run_systems(model_dir: Path, nodes: int, sources: int, transfer: TransferSettings, runtime: RuntimeSettings,
                      burst: dict[str, Any], reference: dict[str, list[int]], systems: list[str],
                      max_seqs: int = 8, device: str = "cpu", dtype: str = "float32",
                      batch_invariant: bool = False,
                      on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One fresh cluster per system: sources hold the model, the burst is fired as it scales out.

    A system that fails (an agent lost, a request timed out) is a row ``{"system", "failed": True,
    "error"}`` and the next system still runs: one failure never discards the others' figures.
    ``on_row`` gets each row as soon as its system is done (``--out`` rewrites its file with it).

    ``device`` is where stages compute ("cuda" on a GPU machine: every agent shares the GPU and
    copies each block host -> GPU as its stage forms). ``batch_invariant``: engine.batch_invariant
    on every stage of every system (``reference`` must come from the same numerics).
    """
    from lambdascale.bench.burst import prepare_sources, serve_scale_out
    from lambdascale.config import LambdaScaleConfig

    manifest = read_manifest(model_dir)
    eos = manifest.arch.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    rows = []
    for system in systems:
        try:
            async with LocalCluster(nodes, transfer, runtime) as lc:
                await prepare_sources(lc.cluster, nodes, list(range(sources)), model_dir)
                rep = await serve_scale_out(lc.cluster, model_dir, manifest, list(range(sources)),
                                            list(range(sources, nodes)), burst, system, eos_ids, max_seqs=max_seqs,
                                            emulate_device=runtime.emulate_device, device=device,
                                            link_gbps=transfer.link_gbps, dtype=dtype,  # type: ignore[arg-type]
                                            batch_invariant=batch_invariant,
                                            # the agents' caps: the core sizes a load's timeout by the SSD cap
                                            config=LambdaScaleConfig(transfer=transfer))
        except (LambdaScaleError, OSError, asyncio.TimeoutError) as e:  # report it; the next system still runs
            rows.append({"system": system, "failed": True, "error": f"{type(e).__name__}: {e}"})
            _progress(f"{system}: FAILED: {rows[-1]['error']}")
            if on_row is not None:
                on_row(rows[-1])
            continue
        ttft = list(rep.ttft.values())
        rows.append({
            "system": system, "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "last_first_token_s": max(ttft, default=0.0), "all_solo_s": rep.all_solo_s,
            "bytes_moved": rep.bytes_moved, "pipelines_formed": rep.pipelines_formed,
            "pipelines_dissolved": rep.pipelines_dissolved, "requests_moved": rep.requests_moved,
            "kv_shipped": rep.kv_shipped, "kv_recomputed": rep.kv_recomputed, "kv_bytes_shipped": rep.kv_bytes_shipped,
            "exact": rep.outputs == reference, "batch_invariant": batch_invariant,
            "replayed_tokens": rep.replayed_tokens, "replay_mismatches": rep.replay_mismatches,
            "mismatched_requests": sorted(r for r in reference if rep.outputs.get(r) != reference[r]),
            # when each instance (full or pipeline) started serving, and on which nodes
            "instance_started_s": dict(rep.instance_started_s),
            "instance_nodes": {k: list(v) for k, v in rep.instance_nodes.items()},
            "instance_forming_s": dict(rep.instance_forming_s),
            "ttft_s": dict(rep.ttft), "first_token_by": dict(rep.first_token_by),
            # when each request's last token came: what lending the sources' devices costs their own requests
            "finish_s": dict(rep.finish), "last_done_s": max(rep.finish.values(), default=0.0),
        })
        _progress(f"{system}: TTFT p99 {rows[-1]['ttft_p99_s']:.2f} s, exact {rows[-1]['exact']}")
        if on_row is not None:
            on_row(rows[-1])
    return rows


def cmd_bench_scale(args: Any) -> int:
    from lambdascale.config import config_from_args

    cfg = config_from_args(args)
    from lambdascale.bench.burst import SystemKind

    known = [k.value for k in SystemKind]
    bad = [x for x in args.systems.split(",") if x not in known]
    if bad:
        raise LambdaScaleError(f"--systems: unknown {bad}; choose from {known}")
    if not 1 <= args.max_seqs <= 1024:
        raise LambdaScaleError(f"--max-seqs must be in [1, 1024], got {args.max_seqs}")
    if args.also_without_emulation and not cfg.runtime.emulate_device:
        raise LambdaScaleError("--also-without-emulation needs --emulate-device (it reruns the burst with emulation off)")
    if cfg.runtime.emulate_device:  # a bad profile is a clear error now, not an agent failure mid-run
        from lambdascale.runtime.emulation import StepTimer, parse_profile

        StepTimer.build(parse_profile(cfg.runtime.emulate_device), 1, 1)
    models_dir = cfg.paths.models_dir
    scratch: Path | None = None
    if args.model.startswith("synthetic:") and args.scratch:
        models_dir = scratch = Path(tempfile.mkdtemp(prefix="lambdascale-bench-"))
    try:
        _run_bench_scale(args, cfg, cfg.transfer, models_dir)
    finally:  # the scratch import is this run's alone: never leave a GB-sized copy in /tmp
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def paced_transfer(transfer: TransferSettings, chunk_bytes: int) -> TransferSettings:
    """Token-bucket and socket-slice granularity for capped links: about 2 ms of link traffic,
    at least min(1 MiB, chunk/16) and at least 64 KiB.

    Small slices pace a link smoothly but cost a Python wake-up each; at a few Gbit/s in 375 KB
    slices six agents' wake-ups made the shared CPU the bottleneck (1 source, 1.2 GB model:
    12.5 s vs 8.8 s with 1 MiB slices). The chunk/16 cap keeps the head start a bucket allows
    negligible against a tiny model's bound.
    """
    if not transfer.link_gbps:  # only an SSD cap (if any) uses the bucket: keep it fine-grained
        return transfer.model_copy(update={"bucket_burst_bytes": min(transfer.bucket_burst_bytes, 64 << 10)})
    floor = min(1 << 20, max(64 << 10, chunk_bytes // 16))
    grain = max(floor, int(gbps_to_bytes_per_s(transfer.link_gbps) * 0.002))
    return transfer.model_copy(update={
        "bucket_burst_bytes": min(transfer.bucket_burst_bytes, grain),
        "io_slice_bytes": min(transfer.io_slice_bytes, grain),
    })


def _run_bench_scale(args: Any, cfg: Any, transfer: TransferSettings, models_dir: Path) -> None:
    model_dir = resolve_model(args.model, models_dir, args.layers, cfg.store.n_blocks, cfg.store.chunks_per_block)
    m = read_manifest(model_dir)
    transfer = paced_transfer(transfer, m.total_bytes // m.n_chunks)
    runtime = cfg.runtime
    if getattr(args, "device_arena", False) and not runtime.device_arena_gb:  # room for one copy, page-aligned
        from lambdascale.runtime.arena import ALIGN

        runtime = runtime.model_copy(update={"device_arena_gb": (m.total_bytes + 2 * ALIGN) / 1e9})
    result = asyncio.run(run_scale_bench(model_dir, args.nodes, args.sources, transfer, runtime, Algo(args.algo)))
    result.device_arena_gb = runtime.device_arena_gb
    result.pipeline_helper_blocks = runtime.pipeline_helper_blocks
    _progress(f"data plane done: multicast {result.multicast_s:.2f} s (x{result.vs_bound or 0:.2f} of bound)")
    if args.burst > 0:
        vocab = m.arch.vocab_size
        burst = make_burst(args.burst, vocab, args.max_tokens)
        inv = cfg.engine.batch_invariant
        ref = reference_outputs(model_dir, burst, dtype=args.stage_dtype, batch_invariant=inv, max_seqs=args.max_seqs)
        result.stage_dtype = args.stage_dtype
        result.batch_invariant = inv
        _progress("single-node reference done")
        if cfg.runtime.emulate_device:
            from lambdascale.runtime.emulation import parse_profile

            result.emulate_device = parse_profile(cfg.runtime.emulate_device).spec
        systems = args.systems.split(",")
        out = getattr(args, "out", None)

        def keep(rows: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
            def on_row(row: dict[str, Any]) -> None:
                rows.append(row)
                if out:
                    write_result(result, Path(out))
            return on_row

        run_systems_ = functools.partial(run_systems, model_dir, args.nodes, args.sources, transfer)
        asyncio.run(run_systems_(runtime, burst, ref, systems, max_seqs=args.max_seqs, dtype=args.stage_dtype,
                                 batch_invariant=inv, on_row=keep(result.systems)))
        if args.also_without_emulation and cfg.runtime.emulate_device:
            asyncio.run(run_systems_(runtime.model_copy(update={"emulate_device": None}), burst, ref, systems,
                                     max_seqs=args.max_seqs, dtype=args.stage_dtype, batch_invariant=inv,
                                     on_row=keep(result.systems_without_emulation)))
    if getattr(args, "out", None):
        write_result(result, Path(args.out))
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(format_table(result))


async def run_efficiency(model_dir: Path, receiver_counts: list[int], transfer: TransferSettings,
                         runtime: RuntimeSettings, repeat: int = 1) -> list[dict[str, Any]]:
    """Uncapped multicast vs point-to-point, side by side on one cluster, for several receiver counts.

    One cluster of ``max(receiver_counts) + 1`` agents (idle agents cost only heartbeats). For
    each count n: point-to-point 0 -> 1 through the same executor (``Algo.DIRECT``), then a binomial
    multicast 0 -> 1..n; rows give p2p Gbit/s, the mean and min per-receiver Gbit/s, their ratio
    to p2p, the sum over receivers / p2p, and the bytes-per-chunk. Best of ``repeat`` per figure.
    """

    manifest = read_manifest(model_dir)
    nodes = max(receiver_counts) + 1
    gbps = lambda s: manifest.total_bytes * 8 / s / 1e9  # noqa: E731
    rows = []
    async with LocalCluster(nodes, transfer.model_copy(update={"link_gbps": None, "ssd_gbps": None}), runtime) as lc:
        await lc.cluster.request(0, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False))

        async def once(rcv: list[int], algo: Algo) -> dict[int, float]:
            await prepare_receivers(lc.cluster, manifest, rcv)
            res = await run_multicast(lc.cluster, manifest, [0], rcv, algo)
            await asyncio.gather(*(lc.cluster.request(r, DropModel(req=0, model=manifest.name)) for r in rcv))
            return res.node_full_s

        for n in receiver_counts:
            p2p = 0.0
            for _ in range(repeat):
                p2p = max(p2p, gbps(max((await once([1], Algo.DIRECT)).values())))
            best: list[float] = []
            for _ in range(repeat):
                per = [gbps(t) for t in (await once(list(range(1, n + 1)), Algo.BINOMIAL)).values()]
                if not best or statistics.mean(per) > statistics.mean(best):
                    best = per
            rows.append({
                "receivers": n, "p2p_gbps": p2p, "per_receiver_mean_gbps": statistics.mean(best),
                "per_receiver_min_gbps": min(best), "efficiency": statistics.mean(best) / p2p,
                "aggregate_efficiency": sum(best) / p2p, "chunk_bytes": manifest.total_bytes // manifest.n_chunks,
                "n_chunks": manifest.n_chunks,
            })
    return rows
