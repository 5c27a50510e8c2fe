"""Top-level API: build the pieces from a :class:`SimSettings` and run several systems on one workload.

Example::

    from lambdascale.sim.run import simulate
    results = simulate(SimSettings(nodes=16, model="llama2-13b"), "path/to/trace.csv")
"""

from __future__ import annotations

from typing import Callable

from lambdascale.control.settings import ControlSettings
from lambdascale.control.spec import Tier
from lambdascale.sim.cluster import ClusterSpec, SimModel, load_cluster, resolve_model
from lambdascale.sim.costmodel import CostModel, load_calibration
from lambdascale.sim.metrics import SimResult
from lambdascale.sim.scaling import Burst, ScalingResult, simulate_scaling
from lambdascale.sim.settings import SimSettings
from lambdascale.sim.simulator import Simulation
from lambdascale.sim.systems import get_systems
from lambdascale.sim.catalogue import Catalogue, SimEntry, assign_models, load_catalogue, resolve, single
from lambdascale.sim.traces import load_workload, read_trace
from lambdascale.sim.workload import Workload


def setup(settings: SimSettings) -> tuple[ClusterSpec, SimModel, CostModel]:
    """Cluster preset, model and calibrated cost model for these settings (one model: ``settings.model``)."""
    cluster = load_cluster(settings.cluster)
    model = resolve_model(settings.model, settings.n_blocks, settings.n_chunks, cluster.gpu.memory_gib,
                          chunk_layout=settings.chunk_layout)
    cal = load_calibration(cluster.gpu.calibration)
    cost = CostModel.build(cal, model.name, model.arch, prefill_scale=cluster.gpu.prefill_scale,
                           decode_scale=cluster.gpu.decode_scale, tp=model.tp, tp_overhead=cluster.gpu.tp_overhead)
    return cluster, model, cost


def catalogue_for(settings: SimSettings) -> Catalogue:
    """``settings.catalogue`` (built-in or file), else the one-model catalogue of ``settings.model``."""
    return load_catalogue(settings.catalogue) if settings.catalogue else single(settings.model)


def setup_catalogue(settings: SimSettings) -> tuple[ClusterSpec, Catalogue, list[SimEntry]]:
    """Cluster preset, catalogue and its models resolved for the cluster (shapes, GPUs, cost models)."""
    cluster = load_cluster(settings.cluster)
    cat = catalogue_for(settings)
    entries = resolve(cat, cluster, settings.n_blocks, settings.n_chunks, settings.chunk_layout,
                      settings.gpus_per_node, strict_fit=settings.catalogue is not None)
    return cluster, cat, entries


def workload_for(settings: SimSettings, trace: str, catalogue: Catalogue | None = None) -> Workload:
    """The trace (or generator) cut to ``duration`` after ``time_scale``, each request given its
    catalogue model (``catalogue.assign_models``; a one-model run: all the first)."""
    w = load_workload(trace, settings.seed, settings.lengths_from)
    w = w.window(settings.duration, settings.time_scale)
    cat = catalogue if catalogue is not None else catalogue_for(settings)
    if len(cat) == 1 and w.model_names is None and cat.models[0].trace is None:
        return w
    return assign_models(w, cat, settings.seed, settings.model_run_length,
                         read=lambda p: read_trace(p, None, settings.seed).window(settings.duration, settings.time_scale),
                         trace_label=trace)


def simulate(settings: SimSettings, trace: str | Workload, control: ControlSettings | None = None,
             progress: Callable[[str, float, float], None] | None = None) -> list[SimResult]:
    """Run every system of ``settings.systems`` on the same workload; results in that order."""
    control = control or ControlSettings()
    cluster, cat, entries = setup_catalogue(settings)
    w = trace if isinstance(trace, Workload) else workload_for(settings, trace, cat)
    out = []
    horizon = w.duration_s
    for system in get_systems(settings.systems):
        cb = (lambda t, name=system.name: progress(name, t, horizon)) if progress else None
        out.append(Simulation(w, cluster, entries, system, settings, control, progress=cb).run())
    return out


def scaling_table(settings: SimSettings, models: list[str], nodes: int, sources: int, tier: Tier,
                  control: ControlSettings | None = None, burst: Burst | None = None) -> list[ScalingResult]:
    """One scale-out per (model, system), each with the same burst if given."""
    control = control or ControlSettings()
    rows = []
    for name in models:
        cluster, model, cost = setup(settings.model_copy(update={"model": name}))
        for system in get_systems(settings.systems):
            rows.append(simulate_scaling(cluster, model, system, settings, control, cost, nodes, sources, tier, burst))
    return rows
