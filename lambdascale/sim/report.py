"""Summaries, tables, JSON and plots of simulation results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lambdascale.sim.metrics import SimResult


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) if len(x) else math.nan


def summarize(r: SimResult, slo_s: float) -> dict[str, Any]:
    """One row of the comparison table (JSON-ready)."""
    first = [e.timeline.first_pipeline_at - e.timeline.decided_at for e in r.scale_events
             if e.timeline.first_pipeline_at is not None]
    full = [e.timeline.all_full_at - e.timeline.decided_at for e in r.scale_events if e.timeline.all_full_at is not None]
    return {
        "system": r.system,
        "requests": int(len(r.ttft)),
        "unfinished": r.unfinished,
        "ttft_p50_s": _pct(r.ttft, 50), "ttft_p90_s": _pct(r.ttft, 90), "ttft_p99_s": _pct(r.ttft, 99),
        "tpot_p50_s": _pct(r.tpot, 50), "tpot_p99_s": _pct(r.tpot, 99),
        "slo_attainment": r.slo_attainment(slo_s),
        "gpu_seconds": r.gpu_seconds,
        "scale_events": len(r.scale_events),
        "scale_first_serve_mean_s": float(np.mean(first)) if first else math.nan,
        "scale_all_full_mean_s": float(np.mean(full)) if full else math.nan,
        "scale_all_full_max_s": float(np.max(full)) if full else math.nan,
        "migrations": r.migrations,
        "kv_shipped": r.kv_shipped,
        "sim_events": r.events,
        "models": len(r.models),
        "starts_by_tier": _sum_dicts(m.starts for m in r.models),
        "bytes_by_tier": _sum_dicts(m.bytes_by_tier for m in r.models),
        "evictions": r.evictions,
        "host_occupancy_mean": float(np.mean(r.mem_host)) if len(r.mem_host) else math.nan,
        "gpu_occupancy_mean": float(np.mean(r.mem_gpu)) if len(r.mem_gpu) else math.nan,
    }


def _sum_dicts(ds: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def per_model(r: SimResult, slo_s: float) -> list[dict[str, Any]]:
    """One row per catalogue model: its requests' TTFT and SLO attainment, starts by tier (gpu,
    host, ssd, store, network), bytes moved to its GPUs per tier, copies evicted."""
    rows = []
    for j, m in enumerate(r.models):
        sel = r.model_idx == j
        t = r.ttft[sel]
        ok = np.sum(np.nan_to_num(t, nan=np.inf) <= slo_s)
        rows.append({"model": m.name, "shape": m.shape, "gpus": m.gpus, "weight": m.weight, "requests": int(sel.sum()),
                     "ttft_p50_s": _pct(t, 50), "ttft_p99_s": _pct(t, 99),
                     "slo_attainment": float(ok / len(t)) if len(t) else math.nan,
                     "starts_by_tier": dict(sorted(m.starts.items())),
                     "bytes_by_tier": dict(sorted(m.bytes_by_tier.items())), "evictions": m.evictions})
    return rows


def table(rows: Sequence[dict[str, Any]], slo_s: float) -> str:
    """Fixed-width text table of :func:`summarize` rows."""
    head = (f"{'system':<14}{'TTFT p50':>9}{'p90':>9}{'p99':>9}{'TPOT p50':>10}{'p99':>8}"
            f"{'SLO<=' + format(slo_s, 'g') + 's':>10}{'GPU-s':>10}{'scales':>7}{'1st serve':>10}{'all full':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['system']:<14}{r['ttft_p50_s']:>9.3f}{r['ttft_p90_s']:>9.3f}{r['ttft_p99_s']:>9.3f}"
            f"{r['tpot_p50_s'] * 1e3:>8.1f}ms{r['tpot_p99_s'] * 1e3:>6.1f}ms{r['slo_attainment'] * 100:>9.1f}%"
            f"{r['gpu_seconds']:>10.0f}{r['scale_events']:>7d}{r['scale_first_serve_mean_s']:>9.2f}s"
            f"{r['scale_all_full_mean_s']:>8.2f}s")
    return "\n".join(lines)


def plot(results: Sequence[SimResult], out_dir: Path, slo_s: float, title: str = "") -> list[Path]:
    """TTFT CDF per system, instances over time against request rate, one scale-out timeline."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        from lambdascale.errors import LambdaScaleError
        raise LambdaScaleError("--plots needs matplotlib: pip install 'lambdascale[plots]'") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        x = np.sort(np.nan_to_num(r.ttft, nan=np.inf))
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=r.system)
    ax.axvline(slo_s, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF {title}")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "ttft_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.6 * len(results) + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        ax.plot(r.series_t, r.series_instances, color="C0", lw=0.8, label="instances")
        if np.any(r.series_pipelines):
            ax.plot(r.series_t, r.series_pipelines, color="C2", lw=0.8, label="pipelines")
        ax.set_ylabel(r.system, fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(r.series_t, r.series_rate, color="C1", lw=0.5, alpha=0.6)
        ax2.set_ylabel("req/s", fontsize=7, color="C1")
    axes[-1, 0].set_xlabel("time (s)")
    axes[0, 0].set_title(f"instances (blue) vs request rate (orange) {title}")
    fig.tight_layout()
    paths.append(out_dir / "instances.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if len(results[0].models) > 1:
        # Per-model TTFT p99 against popularity: where the tail lives in a catalogue.
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            rows = [x for x in per_model(r, slo_s) if x["requests"]]
            ax.scatter([x["weight"] for x in rows], [x["ttft_p99_s"] for x in rows], s=10, label=r.system)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("popularity weight")
        ax.set_ylabel("TTFT p99 (s)")
        ax.axhline(slo_s, color="grey", ls="--", lw=0.8)
        ax.set_title(f"per-model TTFT p99 {title}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "per_model_p99.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.6 * len(results) + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        ax.plot(r.mem_t, r.mem_gpu, lw=0.8, label="GPUs held")
        ax.plot(r.mem_t, r.mem_host, lw=0.8, label="host pools")
        ax.plot(r.mem_t, r.mem_ssd, lw=0.8, label="SSDs")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(r.system, fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("time (s)")
    axes[0, 0].set_title(f"memory occupancy (share of the cluster's) {title}")
    fig.tight_layout()
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # The largest scale-out of the first system: per target, when it could first serve and when full.
    r0 = results[0]
    if r0.scale_events:
        ev = max(r0.scale_events, key=lambda e: (e.n_targets, -e.timeline.decided_at))
        tl = ev.timeline
        fig, ax = plt.subplots(figsize=(6, 0.35 * max(3, len(tl.targets)) + 1))
        for i, n in enumerate(tl.targets):
            full = tl.node_full_at.get(n)
            if full is not None:
                ax.barh(i, full - tl.decided_at, color="C0")
        if tl.first_pipeline_at is not None:
            ax.axvline(tl.first_pipeline_at - tl.decided_at, color="C2", ls="--", label="first pipeline / instance serves")
        ax.set_yticks(range(len(tl.targets)), [f"node {n}" for n in tl.targets])
        ax.set_xlabel("seconds since the scale decision (bar: node holds the full model)")
        ax.set_title(f"{r0.system}: scale-out of {len(tl.targets)} at t={tl.decided_at:.1f}s ({ev.algo})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "scale_timeline.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
