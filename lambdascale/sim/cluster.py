"""Cluster presets and simulated models.

A preset (YAML or JSON, ``lambdascale-cluster`` v1, documented in docs/sim-formats.md) describes
one node type: GPUs per node, GPU memory, which calibration file times its compute and with what
scale factors, and the bandwidth of each link. Packaged presets live in ``lambdascale/sim/presets``;
``--cluster FILE`` takes a user's own.

Links, per node (each direction is a separate link; bandwidths in GB/s = 1e9 bytes/s):

* ``nic_out``/``nic_in``: ``nic_gbps`` Gbit/s per GPU (one NIC per GPU), times the GPUs an
  instance uses (a 70B instance on 4 GPUs drives 4 NICs);
* ``pcie``: host memory -> the GPUs of one instance, ``pcie_GBps`` in total (host memory and the
  root complex limit it, not the GPU count: the λScale testbed loads a 4-GPU 70B at ~54 GB/s);
* ``ssd``: SSD -> host memory, ``ssd_GBps`` per node;
* ``nvlink``: GPU <-> GPU inside a node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambdascale.errors import LambdaScaleError, ModelNotFoundError
from lambdascale.model.arch import SHAPES, ModelArch, plan_blocks
from lambdascale.pipe.layout import ChunkLayout


class ClusterError(LambdaScaleError):
    """A cluster preset is unknown or malformed."""


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="GPU model, for reports")
    memory_gib: float = Field(gt=0, le=10_000, description="GPU memory per GPU")
    calibration: str = Field(default="h200", description="packaged calibration name or file path")
    prefill_scale: float = Field(default=1.0, gt=0, le=100, description="prefill time over the calibrated GPU's")
    decode_scale: float = Field(default=1.0, gt=0, le=100, description="decode time over the calibrated GPU's")
    tp_overhead: float = Field(default=0.15, ge=0, le=10, description="extra time fraction of tensor parallelism")


class LinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nic_gbps: float = Field(gt=0, le=100_000, description="network per GPU, Gbit/s, each direction")
    nic_latency_us: float = Field(default=5.0, ge=0, le=1e6, description="per-transfer network latency")
    pcie_GBps: float = Field(gt=0, le=10_000, description="pinned host -> the GPUs of one instance, GB/s in total")
    nvlink_GBps: float = Field(gt=0, le=100_000, description="GPU <-> GPU inside a node, GB/s")
    ssd_GBps: float = Field(gt=0, le=10_000, description="SSD -> host per node, GB/s")
    flow_GBps: float | None = Field(
        default=None, gt=0, le=100_000,
        description="effective network bandwidth one flow of a one-GPU instance gets (its GPU's NIC), GB/s; "
        "None = the line rate nic_gbps / 8")
    instance_GBps: float | None = Field(
        default=None, gt=0, le=100_000,
        description="effective network bandwidth of an instance spanning several GPUs, all its NICs together, GB/s; "
        "None = GPUs x flow_GBps")
    transfer_setup_s: float = Field(default=0.0, ge=0, le=3600,
                                    description="set-up of one scale-out's transfer before its first chunk moves")
    nccl_init_per_rank_s: float = Field(
        default=0.0, ge=0, le=3600,
        description="a collective's start-up (the NCCL baseline's ring broadcast): seconds per rank beyond the "
        "root, ranks = GPUs of the sources and receivers")


class ClusterSpec(BaseModel):
    """A node type and its links (the preset file's schema)."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(default="lambdascale-cluster", pattern="^lambdascale-cluster$")
    format_version: int = Field(default=1, ge=1, le=1)
    name: str
    description: str = ""
    gpu: GpuSpec
    gpus_per_node: int = Field(default=1, ge=1, le=64, description="GPUs per node")
    host_memory_gib: float = Field(gt=0, description="host memory per node (pinned pool)")
    ssd_gib: float = Field(default=4096.0, gt=0, le=1e9, description="SSD capacity per node (model cache)")
    links: LinkSpec

    def flow_Bps(self) -> float:
        """Bytes/s one flow of a one-GPU instance moves over the network."""
        L = self.links
        return (L.flow_GBps if L.flow_GBps is not None else L.nic_gbps / 8) * 1e9

    def instance_net_Bps(self, gpus: int) -> float:
        """Bytes/s an instance of ``gpus`` GPUs moves over the network, all its NICs together."""
        if gpus <= 1:
            return self.flow_Bps()
        if self.links.instance_GBps is not None:
            return min(gpus * self.flow_Bps(), self.links.instance_GBps * 1e9)
        return gpus * self.flow_Bps()


def preset_names() -> list[str]:
    d = resources.files("lambdascale.sim") / "presets"
    return sorted(p.name.rsplit(".", 1)[0] for p in d.iterdir() if p.name.endswith((".yaml", ".yml")))


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """A packaged preset by name or a preset file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        try:
            text = p.read_text()
        except OSError as e:
            raise ClusterError(f"cannot read cluster file {p}: {e.strerror}") from None
        source = str(p)
    else:
        f = resources.files("lambdascale.sim") / "presets" / f"{name_or_path}.yaml"
        if not f.is_file():
            raise ClusterError(f"unknown cluster preset {name_or_path!r}; presets: {', '.join(preset_names())} (or a file path)")
        text, source = f.read_text(), f"preset {name_or_path}"
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ClusterError(f"cluster file {source} cannot be parsed: {e}") from None
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']} (got {x.get('input')!r})" for x in e.errors())
        raise ClusterError(f"cluster file {source}: {msgs}") from None


#: Model aliases on the CLI -> registered shapes.
ALIASES = {"llama-2-7b": "llama2-7b", "llama-2-13b": "llama2-13b", "llama-2-70b": "llama2-70b",
           "llama-3-8b": "llama3-8b", "7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama2-70b"}


@dataclass(frozen=True)
class SimModel:
    """A model as the simulator sees it: shape, bytes, GPUs per instance, blocks and chunks.

    ``layout`` maps chunks to blocks and gives each chunk's bytes: equal-byte chunks over the
    blocks' real sizes (block 0 holds the embedding, the last block the LM head), as the
    checkpoint format cuts them; ``None`` is the uniform rule (chunk c in block c*B//K, every chunk
    nbytes/K), kept for comparison (``sim.chunk_layout: uniform``).
    """

    name: str
    arch: ModelArch
    nbytes: int
    tp: int
    n_blocks: int
    n_chunks: int
    layout: ChunkLayout | None = None

    @cached_property
    def chunk_bytes(self) -> tuple[float, ...]:
        """Bytes of each chunk, in chunk order."""
        if self.layout is None:
            return (self.nbytes / self.n_chunks,) * self.n_chunks
        return tuple(float(n) for n in self.layout.chunk_lengths())

    @cached_property
    def _blocks_of(self) -> ChunkLayout:
        return self.layout or ChunkLayout.uniform(self.n_blocks, self.n_chunks)

    def blocks_held(self, chunks: set[int]) -> frozenset[int]:
        """Blocks whose every chunk is in ``chunks``."""
        return frozenset(self._blocks_of.blocks_held(chunks))


def block_nbytes(arch: ModelArch, n_blocks: int, dtype_bytes: int = 2) -> list[int]:
    """Bytes of each execution block of ``arch`` cut by :func:`plan_blocks` (headers left out).

    A mixture-of-experts layer counts every expert: a block moves and stores all of them.
    """
    ranges = plan_blocks(arch.num_hidden_layers, n_blocks)
    out = []
    for b, (l0, l1) in enumerate(ranges):
        params = arch.layers_params(l0, l1)
        params += arch.embed_params() if b == 0 else 0
        params += arch.head_params() if b == len(ranges) - 1 else 0
        out.append(params * dtype_bytes)
    return out


def resolve_model(name: str, n_blocks: int = 8, n_chunks: int = 16, gpu_memory_gib: float = 80.0,
                  dtype_bytes: int = 2, chunk_layout: str = "equal-bytes") -> SimModel:
    """A registered shape (``llama2-13b``, aliases like ``llama-2-13b``) or a manifest directory.

    GPUs per instance: the fewest powers of two whose memory holds the weights with 25% to spare
    for KV cache (Llama-2 70B -> 4 on 80 GiB GPUs, as in the λScale testbed). ``chunk_layout``:
    ``equal-bytes`` (the checkpoint format's; a manifest directory's own blocks are re-cut to
    ``n_blocks`` only when it has that many) or ``uniform``.
    """
    if chunk_layout not in ("equal-bytes", "uniform"):
        raise LambdaScaleError(f"chunk_layout must be equal-bytes or uniform, got {chunk_layout!r}")
    key = ALIASES.get(name.lower(), name.lower())
    p = Path(name)
    manifest_blocks: list[int] | None = None
    if key in SHAPES:
        arch, canonical = SHAPES[key], key
    elif (p / "manifest.json").is_file():
        try:
            man = json.loads((p / "manifest.json").read_text())
            arch = ModelArch.model_validate(man["arch"])
            manifest_blocks = [int(b["nbytes"]) for b in man["blocks"]]
            canonical = str(man.get("name", p.name))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ModelNotFoundError(f"{p / 'manifest.json'}: not a lambdascale manifest ({e})") from None
    else:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(sorted(SHAPES))} or a model directory with manifest.json")
    if n_blocks > arch.num_hidden_layers:
        n_blocks = arch.num_hidden_layers
    n_chunks = max(n_chunks, n_blocks)
    if manifest_blocks is not None and len(manifest_blocks) == n_blocks:
        blocks = manifest_blocks
    elif manifest_blocks is not None:  # another block count than the checkpoint's: scale the shape's cut to its bytes
        shape = block_nbytes(arch, n_blocks, dtype_bytes)
        scale = sum(manifest_blocks) / sum(shape)
        blocks = [max(1, round(n * scale)) for n in shape]
    else:
        blocks = block_nbytes(arch, n_blocks, dtype_bytes)
    nbytes = sum(blocks)
    layout = ChunkLayout.equal_bytes(blocks, n_chunks) if chunk_layout == "equal-bytes" else None
    tp = 1
    while nbytes * 1.25 > tp * gpu_memory_gib * 2**30 and tp < 64:
        tp *= 2
    return SimModel(canonical, arch, nbytes, tp, n_blocks, n_chunks, layout)
