"""Scale-out benchmark on local agents: same as ``lambdascale bench scale`` (flags identical).

    .venv/bin/python bench/bench_scale.py --nodes 6 --sources 2 --link-gbps 1 --model synthetic:smollm2-135m --layers 4

``--batch-invariant`` runs every system's stages and the single-node reference of the "exact"
column with ``engine.batch_invariant`` (moved requests are replayed, not re-prefilled):

    .venv/bin/python bench/bench_scale.py --model synthetic:smollm2-135m --stage-dtype bfloat16 --nodes 4 \
        --burst 16 --max-tokens 8 --link-gbps 1 --batch-invariant

``--efficiency`` instead measures uncapped multicast vs point-to-point for 2, 3 and 5 receivers
and two chunk sizes, side by side in one run (issue 6's >= 0.70 figure):

    .venv/bin/python bench/bench_scale.py --efficiency [--model synthetic:smollm2-135m --layers 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path


def efficiency(argv: list[str]) -> int:
    from lambdascale.bench.scale import resolve_model, run_efficiency
    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings

    ap = argparse.ArgumentParser(prog="bench_scale.py --efficiency")
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--receivers", default="2,3,5")
    ap.add_argument("--chunks-per-block", default="2,8", help="comma list: chunk sizes to compare")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nixl"])
    ap.add_argument("--models-dir", default=None,
                    help="use --model (a name) from this directory instead of importing it per chunk size")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.receivers.split(",")]
    print(f"{'chunks':>6} {'KiB/chunk':>9} {'rcv':>3} {'p2p Gb/s':>8} {'mc/rcv Gb/s':>11} {'min':>6} "
          f"{'mc/p2p':>6} {'sum/p2p':>7}")
    with tempfile.TemporaryDirectory(prefix="lambdascale-eff-") as tmp:
        for cpb in (int(x) for x in args.chunks_per_block.split(",")):
            if args.models_dir:  # an existing model: its own chunking, measured once
                model_dir = resolve_model(args.model, Path(args.models_dir), None, 8, cpb)
            else:
                model_dir = resolve_model(args.model, Path(tmp) / f"c{cpb}", args.layers, 8, cpb)
            rows = asyncio.run(run_efficiency(model_dir, counts, TransferSettings(backend=args.transport),
                                              RuntimeSettings(heartbeat_s=1.0, heartbeat_misses=30), args.repeat))
            for r in rows:
                print(f"{r['n_chunks']:>6} {r['chunk_bytes'] / 1024:>9.0f} {r['receivers']:>3} {r['p2p_gbps']:>8.2f} "
                      f"{r['per_receiver_mean_gbps']:>11.2f} {r['per_receiver_min_gbps']:>6.2f} "
                      f"{r['efficiency']:>6.2f} {r['aggregate_efficiency']:>7.2f}")
            if args.models_dir:
                break
    return 0


def batch_invariance(argv: list[str]) -> int:
    """Is one in-process engine batch-invariant? The first N burst requests alone vs batched.

    The exactness column compares agents (which batch) with requests run alone; when this prints
    differing requests, a mismatch there comes from the engine's numerics, not the scale-out path.
    """
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.settings import EngineSettings
    from lambdascale.model.manifest import read_manifest
    from lambdascale.bench.scale import make_burst

    ap = argparse.ArgumentParser(prog="bench_scale.py --batch-invariance")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--burst", type=int, default=48, help="burst the requests are drawn from (same seeds as bench scale)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch-invariant", action="store_true", help="engine.batch_invariant on (docs: engine settings)")
    args = ap.parse_args(argv)
    burst = dict(list(make_burst(args.burst, read_manifest(args.model_dir).arch.vocab_size,
                                 args.max_tokens).items())[: args.requests])
    eng = Engine.from_checkpoint(args.model_dir, EngineSettings(device="cpu", dtype=args.dtype,
                                                                  batch_invariant=args.batch_invariant))
    alone = {rid: [t for o in eng.stream(eng.resume(st, request_id=rid)) for t in o.token_ids] for rid, st in burst.items()}
    res = eng.run_to_completion([eng.resume(st, request_id=rid + "~b") for rid, st in burst.items()])
    batched = {rid[:-2]: [t for o in outs for t in o.token_ids] for rid, outs in res.items()}
    differ = sorted(r for r in alone if alone[r] != batched[r])
    mode = "batch-invariant" if args.batch_invariant else "default"
    print(f"{args.dtype} ({mode}): {len(differ)} of {len(alone)} requests differ batched vs alone: {differ}")
    return 0


if __name__ == "__main__":
    if "--efficiency" in sys.argv[1:]:
        sys.exit(efficiency([a for a in sys.argv[1:] if a != "--efficiency"]))
    if "--batch-invariance" in sys.argv[1:]:
        sys.exit(batch_invariance([a for a in sys.argv[1:] if a != "--batch-invariance"]))
    from lambdascale.cli import main

    sys.exit(main(["bench", "scale", *sys.argv[1:]]))
