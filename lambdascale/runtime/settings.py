"""Cluster runtime configuration section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RuntimeSettings(BaseModel):
    """How node agents are launched, watched and driven."""

    model_config = ConfigDict(extra="forbid")

    launcher: Literal["local", "ray", "external"] = Field(
        default="local",
        description="local spawns agents here; ray places them on a Ray cluster; external waits for agents a "
        "supervisor starts on hosts of one's own (`lambdascale agent --controller HOST:PORT --node N`)",
    )
    controller_bind: str | None = Field(
        default=None,
        description="address (or interface name) the controller listens on for agents; default: 127.0.0.1 "
        "for the local launcher, this host's address toward the Ray head for ray, every interface (0.0.0.0) "
        "for external",
    )
    controller_advertise: str | None = Field(
        default=None,
        description="address launched agents dial to reach the controller (default: the bound address, or "
        "this host's address toward the Ray head when it binds every interface)",
    )
    controller_port: int = Field(
        default=0, ge=0, le=65535,
        description="port the controller listens on (0 = any free port; external agents need a fixed one)",
    )
    nodes: int = Field(default=4, ge=1, le=4096, description="node agents to run")
    address: str | None = Field(default=None, description="Ray cluster address for the ray launcher")
    heartbeat_s: float = Field(default=1.0, gt=0, description="agent heartbeat period")
    heartbeat_misses: int = Field(
        default=5, ge=1, le=1000, description="heartbeats missed in a row before the controller declares an agent lost"
    )
    respawn: bool = Field(
        default=True,
        description="the local launcher restarts an agent process that died (runtime.respawn_backoff_s); the "
        "new process registers as the node's next incarnation. External agents are restarted by their own "
        "supervisor (docs/deploy.md); on Ray the agent's hosting actor restarts it and Ray restarts the actor",
    )
    respawn_backoff_s: float = Field(
        default=0.5, gt=0, le=3600,
        description="wait before restarting a dead agent, doubled for each death in a row up to "
        "respawn_backoff_max_s (a first crash is back in well under the 10 s the membership issue asks; "
        "Kubernetes' CrashLoopBackOff starts at 10 s, systemd's RestartSec at 0.1 s)",
    )
    respawn_backoff_max_s: float = Field(
        default=30.0, gt=0, le=86400,
        description="cap of the restart backoff (an agent that dies at once on every start is tried twice a minute)",
    )
    respawn_reset_s: float = Field(
        default=60.0, gt=0, le=86400,
        description="an agent that ran this long before dying starts its backoff over (Kubernetes resets after 10 min "
        "of running; a minute is many heartbeats here)",
    )
    agent_log_file: str | None = Field(
        default=None,
        description="file the local launcher appends its agents' stderr to (None: the gateway's own stderr)",
    )
    register_timeout_s: float = Field(
        default=60.0, gt=0, description="how long the controller waits for launched agents to register"
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="limit on one control request to an agent (loading a big model from SSD included)"
    )
    multicast_timeout_s: float = Field(
        default=600.0, gt=0, description="give up a multicast that has not completed after this long"
    )
    ray_resource: str = Field(
        default="lambdascale_node", min_length=1, description="custom Ray resource that marks a node able to host one agent"
    )
    pipeline_batch: Literal["kv", "instance"] = Field(
        default="kv",
        description="sequences an execution pipeline takes: kv sizes it by its members' KV memory (a stage "
        "running a fraction f of the layers keeps the KV of max_seqs/f sequences; the pipeline takes the "
        "smallest over its stages); instance gives it a full instance's max_seqs",
    )
    pipeline_microbatches: int = Field(
        default=0, ge=0, le=64,
        description="steps an execution pipeline keeps in flight, each over its own requests, so its stages "
        "compute at once (0: one per stage; 1: one step at a time, each stage idle while the others work)",
    )
    pipeline_helper_blocks: int = Field(
        default=0, ge=0, le=1024,
        description="blocks each node already serving the model (a multicast source) may run as stages of "
        "execution pipelines, for blocks no receiver holds yet, so a pipeline forms before the receivers "
        "hold every block between them (0: receivers only); its stage steps go before its own (runtime.device)",
    )
    kv_move: Literal["auto", "ship", "recompute"] = Field(
        default="auto",
        description="dissolution: auto ships a request's KV to its full instance when that is estimated faster "
        "than recomputing it (runtime.kvmove); ship/recompute force one way",
    )
    kv_link_gbps: float = Field(
        default=25.0, gt=0, le=1e5,
        description="link rate (Gbit/s) assumed for the ship-vs-recompute estimate when links are not capped",
    )
    kv_recompute_tokens_per_s: float = Field(
        default=5000.0, gt=0, le=1e9,
        description="prefill rate assumed for the estimate until the destination has measured its own",
    )
    kv_ship_overhead_s: float = Field(
        default=0.005, ge=0, le=10.0,
        description="fixed cost of one KV move in the estimate (export, send and import round trips)",
    )
    host_capacity_gb: float = Field(
        default=8.0, gt=0, le=1e5,
        description="host-tier capacity of each node agent, GB (mirrors store.host_capacity_gb); a host copy "
        "reserves its bytes before it is made, so the tier is never over-committed",
    )
    agent_ssd_dir: str | None = Field(
        default=None,
        description="directory under which each agent keeps its SSD tier (<dir>/node<N>/<model>); None = no SSD tier",
    )
    agent_ssd_capacity_gb: float = Field(default=64.0, gt=0, le=1e6, description="SSD-tier capacity of each agent, GB")
    device_arena_gb: float = Field(
        default=0.0, ge=0, le=1e5,
        description="resident memory (GB) each agent makes at start for model landing zones, as a GPU's "
        "memory is: receiving a model then touches no fresh page (runtime.arena); 0 = a fresh buffer per model",
    )
    agent_switch_interval_ms: float = Field(
        default=1.0, ge=0.05, le=100,
        description="sys.setswitchinterval of each agent process, ms: how long its engine thread may hold "
        "the interpreter lock while the event loop waits to send; CPython's 5 ms halved a capped tcp "
        "send beside an engine-like thread (bench/bench_transport.py --busy-sender)",
    )
    emulate_device: str | None = Field(
        default=None,
        description="CALIBRATION:MODEL[:SCALE]: engine steps on agents last at least the calibrated GPU time "
        "(e.g. h200:llama2-7b:1); None = real CPU time only",
    )
    secret_file: str | None = Field(
        default=None,
        description="file holding the cluster secret (hex, at least 32 bytes; mode 0600 or stricter, else "
        "refused) that every agent proves on the control channel and on each transport connection; None = a "
        "fresh random secret per cluster start, handed to launched agents in their environment (the "
        "external launcher needs a file: each supervised agent gets a copy as --token-file)",
    )
