"""Model catalogues: the many models that share one simulated cluster, and the workload over them.

A catalogue (``lambdascale-catalogue`` v1, CSV or YAML; docs/sim-formats.md) lists one model per
row: a unique ``name``, a ``shape`` (a registered shape such as ``llama2-7b``, or a model
directory with our manifest), optionally ``gpus`` per instance (default: the fewest that hold
the weights with room for KV cache, as :func:`~lambdascale.sim.cluster.resolve_model` decides),
and its popularity: a ``weight`` (relative request share, >= 0) or a ``trace`` of its own
(a trace file, relative to the catalogue file, whose requests are all that model's; like every
trace it counts from its first request, which arrives when the simulation starts).

Built-ins (``lambdascale/sim/catalogues/``, each file's header says where its numbers come from):
``serverless-64`` and ``finetunes-256``. Errors name the file and line (:class:`CatalogueError`).

:func:`assign_models` gives every request of a trace its model. With a ``model`` column (the
normalized CSV's optional fourth column, BurstGPT's ``Model``) the trace decides, and a name the
catalogue lacks is an error naming the trace's line. Without one, requests are dealt to models by
popularity in *runs*: consecutive requests of the trace (in arrival order) go to one model, runs
geometric with mean ``run_length``, each run's model drawn with probability proportional to its
weight. A model's requests then keep the trace's local bursts instead of being an even thinning
of it (``run_length=1`` is the even thinning). One seeded generator of its own, so the same seed
gives the same workload for every system.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from lambdascale.errors import LambdaScaleError, ModelNotFoundError
from lambdascale.sim.cluster import ClusterSpec, SimModel, resolve_model
from lambdascale.sim.costmodel import CostModel, load_calibration
from lambdascale.sim.workload import Workload

FIELDS = ("name", "shape", "gpus", "weight", "trace")


class CatalogueError(LambdaScaleError):
    """A catalogue or a trace's model column is invalid; the message names the file and line."""


@dataclass(frozen=True)
class CatalogueModel:
    """One row of a catalogue (``line``: where it was read, for errors)."""

    name: str
    shape: str
    gpus: int | None
    weight: float
    trace: str | None
    line: int


@dataclass(frozen=True)
class Catalogue:
    name: str
    source: str
    models: tuple[CatalogueModel, ...]
    base_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.models)

    def index(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.models)}


@dataclass(frozen=True)
class SimEntry:
    """A catalogue model resolved for one cluster: shape, cost model and popularity."""

    model: SimModel
    cost: CostModel | None
    weight: float
    shape: str = ""


def builtin_names() -> list[str]:
    d = resources.files("lambdascale.sim") / "catalogues"
    return sorted(p.name.rsplit(".", 1)[0] for p in d.iterdir() if p.name.endswith(".csv"))


def _row(source: str, line: int, raw: dict[str, Any], seen: dict[str, int]) -> CatalogueModel:
    where = f"{source}:{line}"
    extra = set(raw) - set(FIELDS)
    if extra:
        raise CatalogueError(f"{where}: unknown field(s) {sorted(extra)}; fields: {', '.join(FIELDS)}")
    name = str(raw.get("name") or "").strip()
    if not name:
        raise CatalogueError(f"{where}: a model needs a name")
    if name in seen:
        raise CatalogueError(f"{where}: duplicate model {name!r} (first on line {seen[name]})")
    shape = str(raw.get("shape") or "").strip()
    if not shape:
        raise CatalogueError(f"{where}: model {name!r} needs a shape")
    gpus_raw = raw.get("gpus")
    gpus: int | None = None
    if gpus_raw not in (None, ""):
        try:
            gpus = int(str(gpus_raw))
        except ValueError:
            raise CatalogueError(f"{where}: model {name!r}: gpus must be an integer, got {gpus_raw!r}") from None
        if not 1 <= gpus <= 64:
            raise CatalogueError(f"{where}: model {name!r}: gpus must be in [1, 64], got {gpus}")
    trace = str(raw.get("trace") or "").strip() or None
    w_raw = raw.get("weight")
    if w_raw in (None, ""):
        if trace is None:
            raise CatalogueError(f"{where}: model {name!r} needs a weight or a trace")
        weight = 0.0
    else:
        try:
            weight = float(str(w_raw))
        except ValueError:
            raise CatalogueError(f"{where}: model {name!r}: weight is not a number: {w_raw!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise CatalogueError(f"{where}: model {name!r}: weight must be finite and >= 0, got {weight}")
    seen[name] = line
    return CatalogueModel(name, shape, gpus, weight, trace, line)


def parse_csv(text: str, source: str) -> list[CatalogueModel]:
    """Rows of a CSV catalogue: ``#`` lines are comments; the first other line is the header."""
    lines = text.splitlines()
    body = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not body:
        raise CatalogueError(f"{source}: empty catalogue")
    hline, header_text = body[0]
    header = [h.strip() for h in next(csv.reader([header_text]))]
    bad = [h for h in header if h not in FIELDS]
    if bad or "name" not in header or "shape" not in header:
        raise CatalogueError(f"{source}:{hline}: header must name name, shape and any of gpus, weight, trace; "
                             f"got {header}")
    out: list[CatalogueModel] = []
    seen: dict[str, int] = {}
    for i, ln in body[1:]:
        cells = next(csv.reader(io.StringIO(ln)))
        if len(cells) != len(header):
            raise CatalogueError(f"{source}:{i}: expected {len(header)} fields ({','.join(header)}), got {len(cells)}")
        out.append(_row(source, i, dict(zip(header, (c.strip() for c in cells))), seen))
    return out


def parse_yaml(text: str, source: str) -> list[CatalogueModel]:
    """Rows of a YAML catalogue: ``{format, format_version, name, description, models: [...]}``."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogueError(f"{source}: cannot be parsed: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogueError(f"{source}: expected a mapping with a 'models' list")
    if data.get("format", "lambdascale-catalogue") != "lambdascale-catalogue":
        raise CatalogueError(f"{source}: format must be lambdascale-catalogue, got {data.get('format')!r}")
    if data.get("format_version", 1) != 1:
        raise CatalogueError(f"{source}: format_version must be 1, got {data.get('format_version')!r}")
    # the line of every list item, from the composed node tree
    node_lines: list[int] = []
    assert root is not None
    for k, v in root.value:
        if k.value == "models":
            node_lines = [item.start_mark.line + 1 for item in v.value]
    out: list[CatalogueModel] = []
    seen: dict[str, int] = {}
    for item, line in zip(data["models"], node_lines):
        if not isinstance(item, dict):
            raise CatalogueError(f"{source}:{line}: a model entry must be a mapping, got {item!r}")
        out.append(_row(source, line, item, seen))
    return out


def load_catalogue(name_or_path: str | Path) -> Catalogue:
    """A built-in catalogue by name or a catalogue file (``.csv``, ``.yaml``/``.yml``)."""
    p = Path(name_or_path)
    if p.suffix.lower() in (".csv", ".yaml", ".yml", ".json") or p.exists():
        try:
            text = p.read_text()
        except OSError as e:
            raise CatalogueError(f"cannot read catalogue file {p}: {e.strerror}") from None
        source, base = str(p), p.parent
        kind = "csv" if p.suffix.lower() == ".csv" else "yaml"
    else:
        f = resources.files("lambdascale.sim") / "catalogues" / f"{name_or_path}.csv"
        if not f.is_file():
            raise CatalogueError(f"unknown catalogue {name_or_path!r}; built-ins: {', '.join(builtin_names())} "
                                 "(or a .csv/.yaml file)")
        text, source, base, kind = f.read_text(), f"catalogue {name_or_path}", None, "csv"
    rows = parse_csv(text, source) if kind == "csv" else parse_yaml(text, source)
    if not rows:
        raise CatalogueError(f"{source}: the catalogue lists no model")
    if not any(r.weight > 0 or r.trace for r in rows):
        raise CatalogueError(f"{source}: every weight is 0 and no model has a trace: no model gets requests")
    return Catalogue(p.stem if base is not None else str(name_or_path), source, tuple(rows), base)


def single(model: str) -> Catalogue:
    """The one-model catalogue of ``lambdascale simulate --model``."""
    return Catalogue(model, "--model", (CatalogueModel(model, model, None, 1.0, None, 0),))


def resolve(cat: Catalogue, cluster: ClusterSpec, n_blocks: int, n_chunks: int, chunk_layout: str,
            gpus_per_node: int | None, strict_fit: bool = True) -> list[SimEntry]:
    """Shapes, GPUs per instance and cost models for ``cluster``.

    ``strict_fit``: a model whose instance needs more GPUs than a node has is an error naming its
    line (a catalogue); without it (``--model``) nodes are raised to the model's need, as before.
    """
    cal = load_calibration(cluster.gpu.calibration)
    node_gpus = gpus_per_node or cluster.gpus_per_node
    costs: dict[tuple[str, int], CostModel] = {}
    out: list[SimEntry] = []
    for row in cat.models:
        where = f"{cat.source}:{row.line}" if row.line else cat.source
        try:
            m = resolve_model(row.shape, n_blocks, n_chunks, cluster.gpu.memory_gib, chunk_layout=chunk_layout)
        except ModelNotFoundError as e:
            raise CatalogueError(f"{where}: model {row.name!r}: unknown shape {row.shape!r} ({e})") from None
        need = m.tp
        if row.gpus is not None:
            if row.gpus * cluster.gpu.memory_gib * 2**30 < m.nbytes:
                raise CatalogueError(f"{where}: model {row.name!r}: {m.nbytes / 1e9:.1f} GB of weights do not fit "
                                     f"{row.gpus} GPU(s) of {cluster.gpu.memory_gib:g} GiB")
            need = row.gpus
        if strict_fit and need > node_gpus:
            raise CatalogueError(f"{where}: model {row.name!r} ({row.shape}, {m.nbytes / 1e9:.1f} GB) needs {need} GPUs "
                                 f"per instance; nodes of {cluster.name} have {node_gpus}: too large for any node")
        shape = m.name
        m = replace(m, name=row.name, tp=need)
        key = (shape, need)
        if key not in costs:
            costs[key] = CostModel.build(cal, shape, m.arch, prefill_scale=cluster.gpu.prefill_scale,
                                         decode_scale=cluster.gpu.decode_scale, tp=need,
                                         tp_overhead=cluster.gpu.tp_overhead)
        out.append(SimEntry(m, costs[key], row.weight, shape))
    return out


def assign_models(w: Workload, cat: Catalogue, seed: int, run_length: float,
                  read: Callable[[Path], Workload] | None = None, trace_label: str = "") -> Workload:
    """``w`` with every request's catalogue model (``Workload.model``), as the module says.

    Models with a ``trace`` of their own add that trace's requests (read with ``read``); the main
    workload's requests are dealt to the models with a weight. Same inputs, same result.
    """
    if run_length < 1:
        raise CatalogueError(f"run length must be >= 1 request, got {run_length}")
    index = cat.index()
    label = trace_label or w.name
    if w.model_names is not None:
        idx = np.empty(len(w), dtype=np.int64)
        for i, name in enumerate(w.model_names):
            j = index.get(str(name))
            if j is None:
                line = int(w.source_lines[i]) if w.source_lines is not None else i + 2
                known = ", ".join(list(index)[:8]) + (", ..." if len(index) > 8 else "")
                raise CatalogueError(f"{label}:{line}: model {name!r} is not in catalogue {cat.name} (models: {known})")
            idx[i] = j
        main = replace(w, model=idx)
    else:
        weights = np.array([m.weight if m.trace is None else 0.0 for m in cat.models], dtype=float)
        if len(w) and weights.sum() <= 0:
            raise CatalogueError(f"{cat.source}: no model has a weight > 0 to take the trace's requests")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6F64]))  # its own stream: "mod"
        idx = np.empty(len(w), dtype=np.int64)
        p = weights / weights.sum() if weights.sum() > 0 else weights
        i = 0
        while i < len(w):
            k = int(rng.geometric(1.0 / run_length)) if run_length > 1 else 1
            idx[i:i + k] = int(rng.choice(len(p), p=p))
            i += k
        main = replace(w, model=idx)
    own = [(j, m) for j, m in enumerate(cat.models) if m.trace is not None]
    if not own:
        return main
    if read is None:
        raise CatalogueError(f"{cat.source}: models with their own trace need a trace reader")
    parts = [main]
    for j, m in own:
        assert m.trace is not None
        path = Path(m.trace) if cat.base_dir is None or Path(m.trace).is_absolute() else cat.base_dir / m.trace
        t = read(path)
        parts.append(Workload(t.name, t.arrival_s, t.input_tokens, t.output_tokens, np.full(len(t), j, dtype=np.int64)))
    arr = np.concatenate([p.arrival_s for p in parts])
    order = np.argsort(arr, kind="stable")
    cat_of = np.concatenate([p.model for p in parts if p.model is not None])
    return Workload(w.name, arr[order], np.concatenate([p.input_tokens for p in parts])[order],
                    np.concatenate([p.output_tokens for p in parts])[order], cat_of[order])


__all__ = ["Catalogue", "CatalogueError", "CatalogueModel", "SimEntry", "assign_models", "builtin_names",
           "load_catalogue", "resolve", "single"]
