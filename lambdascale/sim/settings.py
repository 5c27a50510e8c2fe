"""Simulator configuration section (``sim.*``): the defaults of ``lambdascale simulate``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SimSettings(BaseModel):
    """Defaults of ``lambdascale simulate``; every field is also a CLI flag of that command."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="seed of every random component")
    cluster: str = Field(default="h800-ib400", description="cluster preset name or preset file")
    model: str = Field(default="llama2-13b", description="model shape name (llama2-7b/13b/70b, llama3-8b) or a model directory; "
                       "the one model of the run when no catalogue is given")
    catalogue: str | None = Field(
        default=None,
        description="models sharing the cluster: a built-in catalogue (serverless-64, finetunes-256) or a catalogue "
        "file (CSV/YAML, docs/sim-formats.md); None = the one --model")
    model_run_length: float = Field(
        default=4.0, ge=1, le=1e6,
        description="with a catalogue and a trace without a model column: mean length of the runs of consecutive "
        "requests dealt to one model by popularity (geometric), so each model keeps the trace's bursts; 1 = an even "
        "thinning of the trace")
    nodes: int = Field(default=8, ge=1, le=4096, description="nodes in the cluster, sources included")
    gpus_per_node: int | None = Field(default=None, ge=1, le=64,
                                      description="GPUs per node; None = the preset's (raised to a model's GPUs per instance, e.g. 4 for a 70B)")
    systems: str = Field(default="lambdascale,serverlessllm,faasnet,nccl,keepalive",
                         description="comma-separated systems to simulate")
    slo_ttft: float = Field(default=2.5, gt=0, le=3600, description="TTFT objective in seconds; SLO attainment = share of requests within it")
    multicast_mode: Literal["round", "chunk"] = Field(
        default="round", description="multicast execution: round-synchronous (the reference) or chunk-level without barriers")
    n_blocks: int = Field(default=8, ge=1, le=1024, description="execution blocks per model")
    n_chunks: int = Field(default=16, ge=1, le=65536, description="transfer chunks per model (all blocks)")
    chunk_layout: Literal["equal-bytes", "uniform"] = Field(
        default="equal-bytes",
        description="how chunks tile the blocks: equal-byte chunks over the blocks' real sizes (block 0 holds the "
        "embedding, the last the LM head), as the checkpoint format cuts them; uniform: chunk c in block c*B//K, "
        "each model/K bytes (the simulator's rule before 2026-11-28)")
    pipeline_helper_blocks: int = Field(
        default=0, ge=0, le=1024,
        description="blocks each multicast source serving the model may run as stages of execute-while-load "
        "pipelines (as runtime.pipeline_helper_blocks); the device time they take delays the source's own steps")
    pipeline_microbatches: int = Field(
        default=0, ge=0, le=64,
        description="steps a λPipe pipeline keeps in flight, each over its own requests, so its stages compute at "
        "once (as runtime.pipeline_microbatches; 0: one per stage; 1: one step at a time through every stage)")
    pipeline_batch: Literal["kv", "instance"] = Field(
        default="kv",
        description="sequences a λPipe pipeline takes (as runtime.pipeline_batch): kv: max_batch x blocks / its "
        "widest stage's blocks (a stage keeps the KV of its own layers only); instance: max_batch")
    kv_move: Literal["auto", "ship", "recompute"] = Field(
        default="auto",
        description="a dissolving pipeline's requests (as runtime.kv_move): auto ships a request's KV cache to a "
        "full instance with a free slot when that is estimated faster than recomputing it there; ship/recompute "
        "force one way (recompute: the request re-prefills prompt + outputs wherever the router puts it)")
    kv_ship_overhead_s: float = Field(default=0.005, ge=0, le=10.0,
                                      description="fixed cost of one KV move (as runtime.kv_ship_overhead_s)")
    baseline_sources: int = Field(
        default=1, ge=1, le=1024,
        description="multicast sources of the faasnet and nccl baselines: 1, one root as in their papers; "
        "`bench scale` runs one tree or ring per holder (set the holders' count to compare with it)")
    min_instances: int = Field(default=0, ge=0, le=4096, description="instances always kept; 0 = scale to zero (serverless, as DeploymentSpec)")
    target_concurrency: int = Field(default=8, ge=1, le=100_000, description="requests per instance the autoscaler sizes for")
    keep_alive_s: float = Field(default=30.0, ge=0, le=86400, description="idle time before an instance may be removed")
    keepalive_baseline_keep_alive_s: float = Field(default=300.0, ge=0, le=86400,
                                                   description="keep-alive of the keep-alive-only baseline (its one mechanism)")
    max_batch: int = Field(default=32, ge=1, le=4096, description="most sequences one instance runs in a batch")
    max_prefill_tokens: int = Field(default=8192, ge=1, le=10_000_000,
                                    description="most prompt tokens one step prefills (a longer prompt still runs alone)")
    late_binding: bool = Field(
        default=True,
        description="every system's gateway keeps requests queued until an instance can start them in its next step "
        "(control.router_late_binding, budget max_prefill_tokens); off: bind at arrival to any free slot")
    kick_from_zero: bool = Field(
        default=True,
        description="a request that finds no instance of its model triggers a controller pass at once (the real "
        "gateway's scale-from-zero kick) instead of waiting for the next autoscale tick; every system alike")
    kv_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="share of GPU memory left after weights usable for KV cache")
    host_pool_gib: float | None = Field(default=None, ge=0, le=1e6,
                                        description="host-memory pool per node for cached model copies; None = the preset's host memory")
    host_cache_nodes: int | None = Field(default=None, ge=0, le=4096,
                                         description="what-if, off by default: only the nodes (lowest ids) below this have a host pool; "
                                         "the others' pools belong to tenants outside the simulation. None = every node's pool")
    ssd_preloaded: bool = Field(default=True, description="every node starts with the models on its SSD (most popular first, as far as it holds them)")
    drain_s: float = Field(default=600.0, ge=0, le=86400, description="time allowed after the last arrival for requests to finish")
    rate_window_s: float = Field(default=10.0, gt=0, le=3600,
                                 description="window over which the simulated observer measures a model's arrival rate")
    memory_interval_s: float = Field(default=2.0, gt=0, le=3600,
                                     description="period of the memory manager (evictions, copy-backs) in the simulated controller")
    sample_interval_s: float = Field(default=1.0, gt=0, le=3600, description="period of the instances/rate time series")
    duration: float | None = Field(default=None, gt=0, description="replay only the first this-many seconds of the trace")
    lengths_from: str | None = Field(default=None, description="trace file whose token lengths requests-per-second series and synthetic workloads draw from")
    node_faults: str = Field(
        default="",
        description="nodes that leave and return, comma-separated KIND@SECONDS:NODE[+SECONDS] (e.g. "
        "'pause@30:2+20,crash@60:3'): a pause stops the node for the given time (it keeps its memory), a crash "
        "kills it (it keeps its SSD copies); both return as a new incarnation by the runtime's membership rules "
        "(lambdascale.membership, docs/arch/sim.md 'Node loss'), for every model the node held")
    heartbeat_s: float = Field(default=1.0, gt=0, le=3600, description="as runtime.heartbeat_s (detection of a pause)")
    heartbeat_misses: int = Field(default=5, ge=1, le=1000, description="as runtime.heartbeat_misses")
    rejoin_s: float = Field(
        default=0.2, ge=0, le=3600,
        description="a continued agent's re-registration until it is alive (measured on the embedded default: "
        "0.1-0.3 s from SIGCONT; bench/chaos.py)")
    respawn_backoff_s: float = Field(default=0.5, gt=0, le=3600, description="as runtime.respawn_backoff_s")
    agent_start_s: float = Field(
        default=3.0, ge=0, le=3600,
        description="a restarted agent's process start until it registers (its Python and torch imports: ~3 s on "
        "the 2-core sandbox, bench/chaos.py)")
    time_scale: float = Field(default=1.0, gt=0, le=1e4, description="speed up the trace's arrivals by this factor")
