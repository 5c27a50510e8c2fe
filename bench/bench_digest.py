"""What ``transfer.digest`` costs: the receiver's check of one chunk, and a whole multicast.

Part 1 hashes one chunk-sized buffer (``--chunk-mb``) with each check, single-threaded, as a
receiver does per arriving chunk: xxh64 (always on), then SHA-256 (hashlib; SHA-NI where the CPU
has it) and BLAKE3 (one thread) that ``transfer.digest`` adds. Part 2 runs the same multicast of
a model (``--model``, default the demo's shape in bfloat16, 270 MB) from node 0 to ``--receivers`` nodes on the local cluster with
each setting, side by side in one run, uncapped links, best of ``--repeat``.

    PYTHONPATH=. .venv/bin/python bench/bench_digest.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import xxhash

from lambdascale.model.digests import chunk_digests, hasher
from lambdascale.model.manifest import read_manifest
from lambdascale.runtime.launcher import LocalCluster
from lambdascale.runtime.messages import DropModel, HoldModel
from lambdascale.runtime.multicast import prepare_receivers, run_multicast
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.transfer.settings import TransferSettings


def hash_rates(chunk_mb: int, repeat: int) -> dict[str, float]:
    buf = memoryview(os.urandom(chunk_mb << 20))
    fns = {"xxh64": lambda b: xxhash.xxh64(b).hexdigest(), "sha256": hasher("sha256"), "blake3": hasher("blake3")}
    out = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn(buf)
            best = min(best, time.perf_counter() - t)
        out[name] = len(buf) / best / 1e9
    return out


async def multicast_times(model_dir: Path, receivers: int, repeat: int) -> dict[str, float]:
    m = read_manifest(model_dir)
    out = {}
    for algo in ("none", "sha256", "blake3"):
        if algo != "none":
            chunk_digests(model_dir, m, algo)  # computed once per model and cached: not what a scale-out pays
        async with LocalCluster(receivers + 1, TransferSettings(digest=algo), RuntimeSettings()) as lc:
            await lc.cluster.request(0, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False))
            best = float("inf")
            rcv = list(range(1, receivers + 1))
            for _ in range(repeat):
                await prepare_receivers(lc.cluster, m, rcv, model_dir)
                res = await run_multicast(lc.cluster, m, [0], rcv, timeout_s=300)
                best = min(best, res.completion_s)
                await asyncio.gather(*(lc.cluster.request(r, DropModel(req=0, model=m.name)) for r in rcv))
            out[algo] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-mb", type=int, default=16)
    ap.add_argument("--model", default="synthetic:smollm2-135m", help="model multicast (synthetic: bfloat16, 270 MB)")
    ap.add_argument("--receivers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rates = hash_rates(args.chunk_mb, args.repeat)
    print(f"per-chunk check, {args.chunk_mb} MiB, one thread:")
    print("| check | GB/s | ms per chunk |\n| --- | ---: | ---: |")
    for k, v in rates.items():
        print(f"| {k} | {v:.2f} | {args.chunk_mb * 1.048576 / v:.1f} |")
    from lambdascale.model.importers import import_model

    with tempfile.TemporaryDirectory() as d:
        ck = import_model(args.model, Path(d), n_blocks=8)
        times = asyncio.run(multicast_times(ck.dir, args.receivers, args.repeat))
        mb = ck.manifest.total_bytes / 1e6
    print(f"\nmulticast of {mb:.0f} MB, node 0 -> {args.receivers} receivers, local cluster, best of {args.repeat}:")
    print("| transfer.digest | seconds | vs none |\n| --- | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {v:.3f} | {v / times['none']:.2f}x |")


if __name__ == "__main__":
    main()
