"""A request burst fired while a model scales out, on the serving core: ``bench scale``'s workload.

Every system starts with full instances on the sources and a burst of requests submitted to the
core at once; what differs is only the :class:`~lambdascale.control.snapshot.ScalePlan` the core
executes (:mod:`lambdascale.core.scaleout`), so every system runs the product's own queue,
dispatch, units, pipelines, dissolution, KV moves and fault handling:

* ``lambdascale``: binomial multicast with execute-while-load (pipelines across receivers form,
  and dissolve into full instances as receivers fill; with ``runtime.pipeline_helper_blocks`` the
  sources lend stages to the first pipelines);
* ``faasnet``: tree multicast, a node serves once it holds the full model;
* ``nccl``: ring broadcast, a node serves once it holds the full model;
* ``local``: every new node loads the model from its own SSD tier (``transfer.ssd_gbps`` cap).

:func:`serve_scale_out` returns a :class:`ScaleOutReport` (times in seconds from the burst).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from lambdascale.config import LambdaScaleConfig
from lambdascale.control.settings import MulticastAlgo
from lambdascale.control.snapshot import DeploymentSpec, ScalePlan, Source, Target, Tier
from lambdascale.control.timeline import ScaleTimeline
from lambdascale.core.core import ServingCore
from lambdascale.core.state import TokenOut
from lambdascale.engine.sequence import TokenState
from lambdascale.model.manifest import Manifest
from lambdascale.pipe.serving import KvPolicy
from lambdascale.runtime.cluster import Cluster
from lambdascale.runtime.messages import HoldModel, Warmup
from lambdascale.runtime.multicast import MulticastResult
from lambdascale.runtime.pipeline import StageDtype


class SystemKind(str, Enum):
    LAMBDASCALE = "lambdascale"
    FAASNET = "faasnet"
    NCCL = "nccl"
    LOCAL = "local"


_ALGO = {SystemKind.LAMBDASCALE: MulticastAlgo.BINOMIAL, SystemKind.FAASNET: MulticastAlgo.FAASNET,
         SystemKind.NCCL: MulticastAlgo.RING}


def system_plan(system: SystemKind | str, model: str, sources: list[int], receivers: list[int]) -> ScalePlan:
    """The scale-out each system is: the same core, another plan."""
    system = SystemKind(system)
    if system is SystemKind.LOCAL:  # every receiver reads its own SSD copy
        return ScalePlan(model, tuple(Target(n, Tier.SSD) for n in receivers))
    return ScalePlan(model, tuple(Target(n, Tier.NONE) for n in receivers),
                     tuple(Source(s, Tier.HOST) for s in sources), _ALGO[system],
                     execute_while_load=system is SystemKind.LAMBDASCALE)


@dataclass
class ScaleOutReport:
    """What one system did with one burst; times in seconds from the burst."""

    system: SystemKind
    ttft: dict[str, float] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    node_serving_s: dict[int, float] = field(default_factory=dict)  # first time each new node served alone
    all_solo_s: float = 0.0
    pipelines_formed: int = 0
    pipelines_dissolved: int = 0
    requests_moved: int = 0
    instances_failed: int = 0
    bytes_moved: int = 0
    multicast: MulticastResult | None = None
    nodes_lost_s: dict[int, float] = field(default_factory=dict)  # node -> when its loss reached the planner
    instance_started_s: dict[str, float] = field(default_factory=dict)  # unit id -> when it began serving
    instance_forming_s: dict[str, float] = field(default_factory=dict)  # unit id -> seconds its stages took to form
    first_token_by: dict[str, str] = field(default_factory=dict)  # request -> unit that gave its first token
    tokens_by_instance: dict[str, int] = field(default_factory=dict)  # unit id -> tokens it produced
    instance_nodes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unit id -> its stages' nodes
    kv_shipped: int = 0  # requests whose KV moved to their full instance on dissolution
    kv_recomputed: int = 0  # dissolution: requests moved without their KV
    kv_bytes_shipped: int = 0
    batch_invariant: bool = False  # the numerics every stage ran with
    replayed_tokens: int = 0  # batch-invariant recompute: outputs re-fed as decode steps
    replay_mismatches: int = 0  # of those, samples that differed from the streamed token (0 when exact)


async def prepare_sources(cluster: Cluster, nodes: int, sources: list[int], model_dir: Path) -> None:
    """Set-up before :func:`serve_scale_out`: every agent imports its engine (a real node has its
    runtime up before it scales) and the sources hold the model. The sources' read is not paced
    by the SSD cap: it is placement, not part of what a scale-out measures."""
    await asyncio.gather(*(cluster.request(n, Warmup(req=0)) for n in range(nodes)))
    await asyncio.gather(*(cluster.request(s, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False))
                           for s in sources))


def burst_config(base: LambdaScaleConfig, max_seqs: int, max_step_tokens: int, emulate_device: str | None,
                 device: str, dtype: StageDtype, batch_invariant: bool, kv_policy: KvPolicy | str | None,
                 link_gbps: float | None) -> LambdaScaleConfig:
    """``base`` with the burst's engine and runtime settings (what the core reads them from)."""
    engine = base.engine.model_copy(update={
        "max_batch_size": max_seqs, "max_num_batched_tokens": max_step_tokens, "dtype": dtype,
        "device": "cuda" if device.startswith("cuda") else "cpu", "batch_invariant": batch_invariant})
    runtime = base.runtime.model_copy(update={"emulate_device": emulate_device, **(
        {"kv_move": KvPolicy(kv_policy).value} if kv_policy is not None else {})})
    transfer = base.transfer.model_copy(update={"link_gbps": link_gbps})
    serve = base.serve.model_copy(update={"execute_while_load": True, "warm_agents": False})
    return base.model_copy(update={"engine": engine, "runtime": runtime, "transfer": transfer, "serve": serve})


async def serve_scale_out(
    cluster: Cluster,
    model_dir: Path,
    manifest: Manifest,
    sources: list[int],
    receivers: list[int],
    requests: dict[str, TokenState],
    system: SystemKind | str,
    eos_token_ids: frozenset[int] = frozenset(),
    max_seqs: int = 8,
    max_len: int = 512,
    max_step_tokens: int = 512,
    on_pipeline_formed: Callable[[str, list[int]], None] | None = None,
    emulate_device: str | None = None,
    device: str = "cpu",
    kv_policy: KvPolicy | str | None = None,
    link_gbps: float | None = None,
    dtype: StageDtype = "float32",
    batch_invariant: bool = False,
    config: LambdaScaleConfig | None = None,
) -> ScaleOutReport:
    """Fire ``requests`` at once and scale ``manifest`` from ``sources`` (holding it) to ``receivers``.

    The cluster's own settings (``cluster.settings``: the runtime section) and ``config`` (default:
    the defaults) give every other knob. ``kv_policy`` (default ``runtime.kv_move``) decides how a
    dissolving pipeline's requests take their KV along; ``link_gbps`` is the link rate for that
    estimate. ``dtype`` is what every stage computes in (the exactness reference must use the
    same). ``batch_invariant`` turns on the engine's batch-invariant numerics on every stage.
    ``on_pipeline_formed(unit id, nodes)`` is called as each pipeline starts serving.
    """
    system = SystemKind(system)
    base = config or LambdaScaleConfig()
    base = base.model_copy(update={"runtime": cluster.settings})
    cfg = burst_config(base, max_seqs, max_step_tokens, emulate_device, device, dtype, batch_invariant, kv_policy,
                       link_gbps)
    core = ServingCore(cluster, cfg)
    rep = ScaleOutReport(system, batch_invariant=batch_invariant)
    spec = DeploymentSpec(min_instances=len(sources), max_instances=len(sources) + len(receivers))
    d = await core.deploy(manifest.name, model_dir, manifest, spec, eos_token_ids, max_len, start_on=sources)
    if on_pipeline_formed is not None:
        core.on_unit_started.append(lambda u: on_pipeline_formed(u.id, list(u.nodes)) if u.pipelined else None)
    done = asyncio.Event()
    failures: list[BaseException] = []
    t0 = core.clock.now()

    def sink(rid: str) -> Callable[[TokenOut | BaseException], None]:
        def on(item: TokenOut | BaseException) -> None:
            now = core.clock.now() - t0
            if isinstance(item, BaseException):
                failures.append(item)
                done.set()
                return
            if rid not in rep.ttft:
                rep.ttft[rid] = now
                rep.first_token_by[rid] = item.unit
            rep.outputs.setdefault(rid, []).append(item.token_id)
            rep.tokens_by_instance[item.unit] = rep.tokens_by_instance.get(item.unit, 0) + 1
            if item.finish is not None:
                rep.finish[rid] = now
                if len(rep.finish) == len(requests):
                    done.set()
        return on

    try:
        for rid, st in requests.items():
            core.submit(d.name, rid, st.prompt_ids, st.params, st.seed, sink(rid), st.output_ids)
        tl = ScaleTimeline(event_id=0, model=d.name, decided_at=t0, targets=tuple(receivers))
        job = core.start_scale_out(system_plan(system, d.name, sources, receivers), tl)
        assert job is not None and job.task is not None
        await job.task
        if job.error is not None:
            raise job.error
        rep.multicast = job.result
        rep.bytes_moved = job.result.bytes_moved if job.result is not None else 0
        await done.wait()
        if failures:
            raise failures[0]
    finally:
        await core.close()
    st_ = core.stats
    first_solo: dict[int, float] = {}
    for u in core.units_seen:
        assert u.started_at is not None
        rep.instance_started_s[u.id] = u.started_at - t0
        rep.instance_forming_s[u.id] = u.forming_s
        rep.instance_nodes[u.id] = u.nodes
        if not u.pipelined and u.node in receivers:
            first_solo.setdefault(u.node, u.started_at - t0)
        if u.server is not None:
            rep.replayed_tokens += u.server.replayed_tokens
            rep.replay_mismatches += u.server.replay_mismatches
    rep.node_serving_s = first_solo
    missing = [n for n in receivers if n not in first_solo and n in cluster.alive()]
    if missing:
        raise RuntimeError(f"nodes {missing} hold the model but never started serving alone")
    rep.all_solo_s = max(first_solo.values(), default=0.0)
    rep.pipelines_formed, rep.pipelines_dissolved = st_.pipelines_formed, st_.pipelines_dissolved
    rep.requests_moved, rep.instances_failed = st_.requests_moved, st_.units_failed
    rep.kv_shipped, rep.kv_recomputed, rep.kv_bytes_shipped = st_.kv_shipped, st_.kv_recomputed, st_.kv_bytes_shipped
    rep.nodes_lost_s = {n: t - t0 for n, t in st_.node_lost_at.items()}
    return rep
