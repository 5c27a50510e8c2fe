"""Memory-tier operations on a real node agent: where a load comes from, and what copy-back costs.

One agent process (LocalCluster(1)) with its own SSD tier in a temp dir. Rows, each the median of
``--repeat`` runs: a load from the model store (HoldModel, page cache warm), a copy-back gpu -> host
(verification pass over the shared buffers), a copy-back -> the agent's SSD tier (write + fsync),
a load from the agent's own SSD copy, and a host-tier hit (buffers complete: no read). Prints a table.

    .venv/bin/python bench/bench_memory.py [--model synthetic:smollm2-135m --layers 2 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path


async def _until_done(c, tier: str, name: str) -> None:
    while True:
        h = (await c.holdings(0)).tiers_of(name).get(tier)
        if h is not None and h.blocks is None:
            return
        await asyncio.sleep(0.002)


async def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from lambdascale.model.importers import import_model
    from lambdascale.runtime.launcher import LocalCluster
    from lambdascale.runtime.messages import DropModel, HoldModel
    from lambdascale.runtime.settings import RuntimeSettings

    tmp = Path(tempfile.mkdtemp(prefix="lsmem-"))
    ck = import_model(args.model, tmp / "models", layers=args.layers, dtype=args.dtype, n_blocks=min(8, args.layers), chunks_per_block=4)
    name, nbytes = ck.manifest.name, ck.manifest.total_bytes
    rt = RuntimeSettings(host_capacity_gb=max(1.0, 4 * nbytes / 1e9), agent_ssd_dir=str(tmp / "ssd"))
    times: dict[str, list[float]] = {}

    def rec(k: str, t0: float) -> None:
        times.setdefault(k, []).append(time.perf_counter() - t0)

    async with LocalCluster(1, runtime=rt) as lc:
        c = lc.cluster
        for _ in range(args.repeat):
            for tier in ("ssd", "host", "gpu"):  # nothing is in use between rounds: never refused
                await c.evict(0, name, tier)
            await c.request(0, DropModel(req=0, model=name))
            t0 = time.perf_counter()
            await c.request(0, HoldModel(req=0, model_dir=str(ck.dir), tier="gpu"))
            rec("load from the model store (HoldModel)", t0)
            t0 = time.perf_counter()
            await c.copy_back(0, name, "host")
            await _until_done(c, "host", name)
            rec("copy-back gpu -> host (verify pass)", t0)
            t0 = time.perf_counter()
            await c.copy_back(0, name, "ssd")
            await _until_done(c, "ssd", name)
            rec("copy-back -> own SSD tier (write+fsync)", t0)
            t0 = time.perf_counter()
            await c.request(0, HoldModel(req=0, model_dir=str(ck.dir), reuse=True))
            rec("host-tier hit (buffers complete)", t0)
            await c.evict(0, name, "gpu")
            await c.evict(0, name, "host")
            t0 = time.perf_counter()
            d = await c.request(0, HoldModel(req=0, model_dir=str(ck.dir), tier="gpu"))
            assert d["source"] == "ssd", d
            rec("load from own SSD copy (HoldModel)", t0)
    return [(k, statistics.median(v), nbytes / statistics.median(v) / 1e9) for k, v in times.items()], nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:smollm2-135m")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rows, nbytes = asyncio.run(run(args))
    print(f"model {args.model} layers={args.layers} {args.dtype}: {nbytes / 1e6:.1f} MB, median of {args.repeat}")
    print(f"{'operation':42s} {'seconds':>9s} {'GB/s':>7s}")
    for k, s, gbps in rows:
        print(f"{k:42s} {s:9.4f} {gbps:7.2f}")


if __name__ == "__main__":
    main()
