"""Device-machine check: uncapped multicast per receiver against point-to-point, with a core per agent.

Issue 6 asks that, uncapped, each receiver's multicast throughput be at least 70% of one
point-to-point transfer's in the same run. On the 2-core development VM n receivers split the two
cores that one point-to-point stream already uses, so the figure there says more about the VM than
about the multicast. The device machine has 16 cores: one per agent and more. This runs
``lambdascale bench scale``'s data-plane part (``lambdascale.bench.scale.run_scale_bench``) for
1, 2, 3 and 5 receivers from one source, uncapped, and prints per-receiver Gbit/s, the
point-to-point figure of the same run, and their ratio. One capped row (``--link-gbps``, two
sources) checks the multicast against its bound at a rate this VM cannot reach.

``--smoke`` runs a tiny model with 1 and 2 receivers on CPU in seconds (a test runs it);
``--dry-run`` checks the arguments only. Results go to ``--json`` (or ``$OUT/multicast.json``),
rewritten after each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 and 2 receivers")
    ap.add_argument("--model", default="synthetic:qwen2-0.5b", help="synthetic:SHAPE")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--chunks-per-block", type=int, default=2)
    ap.add_argument("--receivers", default="1,2,3,5", help="comma list of receiver counts (one source each)")
    ap.add_argument("--link-gbps", type=float, default=16.0, help="the capped row's link (two sources); 0 skips it")
    ap.add_argument("--capped-nodes", type=int, default=6)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nixl"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.receivers, args.link_gbps, args.capped_nodes = "synthetic:tiny-llama", "1,2", 0.05, 3
    try:
        receivers = [int(r) for r in args.receivers.split(",") if r]
    except ValueError:
        print(f"--receivers must be a comma list of integers, got {args.receivers!r}", file=sys.stderr)
        return 2
    if not receivers or min(receivers) < 1 or args.capped_nodes < 3 or args.link_gbps < 0:
        print("--receivers must be >= 1 each, --capped-nodes >= 3, --link-gbps >= 0", file=sys.stderr)
        return 2
    if not args.model.startswith("synthetic:"):
        print("--model must be synthetic:SHAPE", file=sys.stderr)
        return 2
    from lambdascale.errors import LambdaScaleError
    from lambdascale.model.arch import synthetic_arch

    try:
        layers = synthetic_arch(args.model).num_hidden_layers
    except LambdaScaleError as e:  # unknown shape: the message lists the known ones
        print(f"--model {args.model}: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.blocks <= layers:
        print(f"--blocks {args.blocks} must be in [1, {layers}] (the model's layers)", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"plan: {args.model} in {args.blocks} blocks x {args.chunks_per_block} chunks; uncapped, 1 source, "
              f"receivers {receivers}; capped row: {args.link_gbps or 'skipped'} Gbit/s, {args.capped_nodes} nodes, "
              f"2 sources; transport {args.transport}")
        return 0

    from lambdascale.bench.scale import resolve_model, run_scale_bench
    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings

    out = args.json or (os.path.join(os.environ["OUT"], "multicast.json") if os.environ.get("OUT") else None)
    result: dict = {"cores": os.cpu_count(), "transport": args.transport, "rows": [], "capped": None}
    runtime = RuntimeSettings(heartbeat_s=1.0)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lambdascale-device-multicast-") as tmp:
        model_dir = resolve_model(args.model, Path(tmp), None, args.blocks, args.chunks_per_block)
        print(f"{args.model}: {os.cpu_count()} cores, transport {args.transport}", flush=True)
        print(f"{'receivers':>9} {'p2p Gbit/s':>10} {'per receiver Gbit/s':>32} {'mean / p2p':>10} {'sum / p2p':>9}")
        for n in receivers:
            r = asyncio.run(run_scale_bench(model_dir, n + 1, 1, TransferSettings(backend=args.transport), runtime))
            row = {"receivers": n, "p2p_gbps": r.p2p_gbps, "receiver_gbps": r.multicast_receiver_gbps,
                   "efficiency": r.efficiency, "aggregate_efficiency": r.aggregate_efficiency}
            result["rows"].append(row)
            print(f"{n:>9} {r.p2p_gbps:>10.2f} {', '.join(f'{g:.2f}' for g in r.multicast_receiver_gbps):>32} "
                  f"{r.efficiency:>10.2f} {r.aggregate_efficiency:>9.2f}", flush=True)
            _write(out, result)
        if args.link_gbps:
            r = asyncio.run(run_scale_bench(model_dir, args.capped_nodes, 2,
                                            TransferSettings(backend=args.transport, link_gbps=args.link_gbps), runtime))
            result["capped"] = {"nodes": args.capped_nodes, "sources": 2, "link_gbps": args.link_gbps,
                                "multicast_s": r.multicast_s, "bound_s": r.bound_s, "vs_bound": r.vs_bound,
                                "single_source_vs_bound": r.single_source_vs_bound}
            print(f"capped {args.link_gbps} Gbit/s, {args.capped_nodes} nodes: 2 sources {r.vs_bound:.2f}x of the bound, "
                  f"1 source {r.single_source_vs_bound:.2f}x (goal <= 1.25)", flush=True)
    result["wall_s"] = time.monotonic() - t0
    _write(out, result)
    return 0


def _write(out: str | None, result: dict) -> None:
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
