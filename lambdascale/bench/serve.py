"""``lambdascale bench serve``: replay a trace against a running gateway and report latency and cost.

The workload is generated *before* the run (a normalized CSV ``arrival_s,input_tokens,output_tokens``
or a seeded synthetic bursty profile), then scaled to fit the machine: arrival times multiplied
by ``time_scale``, token counts capped. Each request is a streamed ``/v1/completions`` call whose
prompt is ``input_tokens`` token ids (printable-ASCII ids, valid in every vocabulary we ship) and
whose ``max_tokens`` is its output length with ``ignore_eos``, so lengths follow the trace exactly.
While it runs, ``/admin/status`` is polled to integrate node-seconds (nodes hosting at least one
instance or pipeline stage) and to plot instances over time.

This module is imported by the CLI parser, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lambdascale.errors import LambdaScaleError


class BenchInputError(LambdaScaleError):
    """A trace file is missing or malformed (the message names the file, row and column)."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of the workload, after scaling."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    #: a burst's own prompt and sampling (``burst:N``); else printable-ASCII ids, greedy
    prompt_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class RequestResult:
    arrival_s: float            # scheduled send time, relative to the start
    status: int                 # HTTP status (0 = connection failed)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0


@dataclass
class StatusSample:
    t_s: float
    instances: int
    nodes_busy: int


@dataclass
class BenchResult:
    requests: list[RequestResult]
    samples: list[StatusSample]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r.status == 200 and r.ttft_s is not None]
        ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
        itl = sorted(x for r in ok for x in r.itl_s)
        tokens = sum(r.output_tokens for r in ok)
        node_s = 0.0
        for a, b in zip(self.samples, self.samples[1:]):
            node_s += a.nodes_busy * (b.t_s - a.t_s)
        by_status: dict[str, int] = {}
        for r in self.requests:
            by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
        return {
            "requests": len(self.requests), "ok": len(ok), "by_status": by_status,
            "ttft_p50_ms": _pct(ttft, 50) * 1e3, "ttft_p90_ms": _pct(ttft, 90) * 1e3, "ttft_p99_ms": _pct(ttft, 99) * 1e3,
            "itl_p50_ms": _pct(itl, 50) * 1e3, "itl_p90_ms": _pct(itl, 90) * 1e3, "itl_p99_ms": _pct(itl, 99) * 1e3,
            "throughput_tok_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "throughput_req_s": len(ok) / self.wall_s if self.wall_s > 0 else 0.0,
            "node_seconds": node_s if self.samples else float("nan"),
            "wall_s": self.wall_s,
        }


def _pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``xs`` (nan when empty)."""
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


# ---- workloads ------------------------------------------------------------------------------------

def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a normalized-schema CSV; errors name the file, row and column."""
    p = Path(path)
    try:
        f = p.open(newline="")
    except OSError as e:
        raise BenchInputError(f"cannot read trace {p}: {e.strerror}") from None
    out: list[TraceRequest] = []
    with f:
        reader = csv.DictReader(f)
        need = ("arrival_s", "input_tokens", "output_tokens")
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
            raise BenchInputError(f"trace {p} must have columns {need} (got {reader.fieldnames})")
        last = -math.inf
        for i, row in enumerate(reader, start=2):
            try:
                t = float(row["arrival_s"])
                n_in, n_out = int(row["input_tokens"]), int(row["output_tokens"])
            except (TypeError, ValueError):
                raise BenchInputError(f"trace {p} row {i}: non-numeric value in {dict(row)}") from None
            if t < last or n_in < 0 or n_out < 0 or not math.isfinite(t):
                raise BenchInputError(f"trace {p} row {i}: arrivals must be sorted and counts non-negative ({dict(row)})")
            last = t
            out.append(TraceRequest(t, n_in, n_out))
    return out


def synthetic_bursty(duration_s: float = 60.0, base_rps: float = 0.5, burst_rps: float = 6.0,
                     burst_every_s: float = 20.0, burst_len_s: float = 4.0, seed: int = 0) -> list[TraceRequest]:
    """A seeded bursty profile: Poisson arrivals at ``base_rps`` with ``burst_rps`` bursts, generated up front.

    Thinning a Poisson process at the peak rate gives exact piecewise-constant rates (no clipped gaps).
    """
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t = 0.0
    peak = max(base_rps, burst_rps)
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        in_burst = (t % burst_every_s) >= burst_every_s - burst_len_s
        rate = burst_rps if in_burst else base_rps
        if rng.random() < rate / peak:
            out.append(TraceRequest(t, int(rng.lognormvariate(5.0, 0.8)) + 1, int(rng.lognormvariate(4.0, 0.7)) + 1))


#: token ids a burst's prompts draw from: valid in every vocabulary we ship
_BURST_VOCAB = 127


def burst_workload(n: int, max_tokens: int, seed: int = 0) -> list[TraceRequest]:
    """``bench scale``'s burst (:func:`lambdascale.bench.scale.make_burst`: ``n`` requests at once,
    16-32 token prompts, alternating greedy and sampled, seeded) as a workload for the gateway,
    so a scale-out under the same burst can be timed with HTTP in the path."""
    from lambdascale.bench.scale import make_burst

    burst = make_burst(n, _BURST_VOCAB, max_tokens, seed)
    return [TraceRequest(0.0, len(st.prompt_ids), st.params.max_tokens, tuple(st.prompt_ids),
                         st.params.temperature, st.params.top_p, st.seed) for st in burst.values()]


def scale_workload(reqs: list[TraceRequest], time_scale: float = 1.0, max_duration_s: float | None = None,
                   max_requests: int | None = None, max_input_tokens: int = 256,
                   max_output_tokens: int = 64) -> list[TraceRequest]:
    """Fit a workload to this machine: compress time, cap lengths, cut the tail."""
    out: list[TraceRequest] = []
    t0 = reqs[0].arrival_s if reqs else 0.0
    for r in reqs:
        t = (r.arrival_s - t0) * time_scale
        if max_duration_s is not None and t > max_duration_s:
            break
        n_in = max(1, min(r.input_tokens, max_input_tokens))
        out.append(replace(r, arrival_s=t, input_tokens=n_in, output_tokens=max(1, min(r.output_tokens, max_output_tokens)),
                           prompt_ids=r.prompt_ids[:n_in] if r.prompt_ids is not None else None))
        if max_requests is not None and len(out) >= max_requests:
            break
    return out


# ---- replay -----------------------------------------------------------------------------------------

async def _one(client: Any, model: str, req: TraceRequest, start: float, seed: int) -> RequestResult:
    res = RequestResult(arrival_s=req.arrival_s, status=0)
    delay = start + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rng = random.Random(seed)
    prompt = list(req.prompt_ids) if req.prompt_ids is not None else [rng.randrange(32, 127) for _ in range(req.input_tokens)]
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": req.output_tokens, "stream": True,
                            "ignore_eos": True, "temperature": req.temperature}
    if req.temperature > 0:
        body["top_p"] = req.top_p
        body["seed"] = req.seed if req.seed is not None else seed
    t_send = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    res.status = int(payload["error"].get("code") or 503)
                    return res
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - t_send
                else:
                    res.itl_s.append(now - last)
                last = now
                res.output_tokens += 1
    except Exception as e:  # connection-level failure: recorded, the replay goes on
        res.status = 0 if res.status in (0, 200) else res.status
        res.e2e_s = None
        _ = e
        return res
    res.e2e_s = time.perf_counter() - t_send
    return res


async def replay(url: str, model: str, workload: list[TraceRequest], api_key: str | None = None,
                 poll_s: float = 0.5, seed: int = 0, max_connections: int = 256) -> BenchResult:
    """Send ``workload`` on schedule; poll status; return every request's timings."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    samples: list[StatusSample] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                try:
                    st = (await client.get("/admin/status")).json()
                    busy = {n for i in st["instances"] for n in i["nodes"]}
                    samples.append(StatusSample(time.perf_counter() - start, len(st["instances"]), len(busy)))
                except Exception:  # status is best effort (no admin key, gateway busy)
                    pass
                try:
                    await asyncio.wait_for(done.wait(), poll_s)
                except asyncio.TimeoutError:
                    pass

        poller = asyncio.create_task(poll())
        results = await asyncio.gather(*(_one(client, model, r, start, seed + i) for i, r in enumerate(workload)))
        wall = time.perf_counter() - start
        done.set()
        await poller
    return BenchResult(list(results), samples, wall)


# ---- report -----------------------------------------------------------------------------------------

def format_table(summary: dict[str, Any]) -> str:
    rows = [
        ("requests (ok / total)", f"{summary['ok']} / {summary['requests']}  {summary['by_status']}"),
        ("TTFT p50 / p90 / p99 ms", f"{summary['ttft_p50_ms']:.1f} / {summary['ttft_p90_ms']:.1f} / {summary['ttft_p99_ms']:.1f}"),
        ("ITL p50 / p90 / p99 ms", f"{summary['itl_p50_ms']:.1f} / {summary['itl_p90_ms']:.1f} / {summary['itl_p99_ms']:.1f}"),
        ("throughput tok/s, req/s", f"{summary['throughput_tok_s']:.1f}, {summary['throughput_req_s']:.2f}"),
        ("node-seconds", f"{summary['node_seconds']:.1f}"),
        ("wall s", f"{summary['wall_s']:.1f}"),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def write_plots(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """PNG plots of request rate, instances and TTFT over time (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchInputError("plots need matplotlib: pip install 'lambdascale[plots]' (or drop --plot-dir)") from None
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def panel(name: str, xlabel: str, ylabel: str, title: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(7, 3))
        draw(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(d / name)
        plt.close(fig)
        paths.append(d / name)

    arrivals = [r.arrival_s for r in result.requests]
    ok = [(r.arrival_s, r.ttft_s * 1e3) for r in result.requests if r.ttft_s is not None]
    panel("request_rate.png", "time (s)", "requests / s", "request rate",
          lambda ax: arrivals and ax.hist(arrivals, bins=max(1, int(max(arrivals)) + 1), range=(0, max(arrivals) + 1)))
    panel("instances.png", "time (s)", "instances", "instances",
          lambda ax: ax.step([s.t_s for s in result.samples], [s.instances for s in result.samples], where="post"))
    panel("ttft.png", "arrival (s)", "TTFT (ms)", "time to first token",
          lambda ax: ok and ax.scatter([a for a, _ in ok], [b for _, b in ok], s=6))
    return paths


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="synthetic",
                   help="normalized CSV (arrival_s,input_tokens,output_tokens), 'synthetic', or 'burst:N' "
                        "(bench scale's burst: N requests at once, --max-output-tokens each)")
    p.add_argument("--model", default="smollm2-135m", help="deployed model to send requests to")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.1 = ten times denser)")
    p.add_argument("--duration", type=float, default=30.0, help="replay at most this many (scaled) seconds")
    p.add_argument("--max-requests", type=int, default=200, help="replay at most this many requests")
    p.add_argument("--max-input-tokens", type=int, default=128, help="cap on prompt length")
    p.add_argument("--max-output-tokens", type=int, default=32, help="cap on output length")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic profile and prompts")
    p.add_argument("--plot-dir", default=None, help="write request_rate.png, instances.png, ttft.png here")
    p.add_argument("--out", default=None, help="write the summary and per-request results as JSON here")


def run_bench_cli(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    if args.time_scale <= 0 or args.duration <= 0 or args.max_requests < 1:
        raise BenchInputError("--time-scale and --duration must be > 0 and --max-requests >= 1")
    if args.trace == "synthetic":
        raw = synthetic_bursty(duration_s=args.duration / args.time_scale, seed=args.seed)
    elif args.trace.startswith("burst:"):
        n = args.trace.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise BenchInputError(f"--trace {args.trace}: burst:N needs a whole number N >= 1")
        raw = burst_workload(int(n), args.max_output_tokens, args.seed)
    else:
        raw = load_trace(args.trace)
    workload = scale_workload(raw, args.time_scale, args.duration, args.max_requests,
                              args.max_input_tokens, args.max_output_tokens)
    if not workload:
        raise BenchInputError(f"the workload from {args.trace} is empty after scaling")
    print(f"replaying {len(workload)} requests over {workload[-1].arrival_s:.1f} s against {url} (model {args.model})")
    result = asyncio.run(replay(url, args.model, workload, api_key, seed=args.seed))
    summary = result.summary()
    print(format_table(summary))
    if args.plot_dir:
        for path in write_plots(result, args.plot_dir):
            print(f"wrote {path}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "requests": [asdict(r) for r in result.requests]}, indent=1))
    return 0
