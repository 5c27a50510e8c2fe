"""Multicast across emulated hosts: links capped by the kernel (``tc netem rate``) against the
same cap in Python token buckets (``transfer.link_gbps``), side by side in one run.

Each of N hosts is a network namespace on a bridge (``tests/multihost/netns.py``); its agent is
started by hand (``lambdascale agent``, ``runtime.launcher: external``) and the controller listens
in the root namespace. Node 0 holds the model; a binomial multicast sends it to the others. The
kernel row caps every host's veth pair at ``--rate-mbit`` both ways (and adds ``--delay-ms``);
the Python row leaves the links alone and caps each agent's send and receive at the same rate.
Both are compared with the bound (k - 1 + ceil(log2 n)) / k x size / rate. Needs root.

``--burst N`` runs ``bench scale``'s burst instead (the code ``lambdascale bench scale`` runs:
``run_systems``): N requests fired at once while the model scales out from one source to the
other hosts, for λScale (execute-while-load pipelines across hosts) and FaaSNet (the same
multicast, serving only once a node holds the whole model), under each kind of cap, with every
output checked against a single engine's.

    .venv/bin/python bench/bench_netns.py --hosts 4 --rate-mbit 200 [--delay-ms 0.5]
    .venv/bin/python bench/bench_netns.py --hosts 4 --rate-mbit 200 --burst 16 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.multihost


async def _multicast(n: int, model_dir: Path, transfer, runtime) -> float:
    from lambdascale.model.manifest import read_manifest
    from lambdascale.runtime.launcher import LocalCluster
    from lambdascale.runtime.messages import HoldModel
    from lambdascale.runtime.multicast import prepare_receivers, run_multicast

    manifest = read_manifest(model_dir)
    async with LocalCluster(n, transfer, runtime) as lc:
        await lc.cluster.request(0, HoldModel(req=0, model_dir=str(model_dir), ssd_cap=False))
        receivers = list(range(1, n))
        await prepare_receivers(lc.cluster, manifest, receivers)
        t0 = time.monotonic()
        res = await run_multicast(lc.cluster, manifest, [0], receivers)
        assert set(res.node_full_s) == set(receivers)
        return time.monotonic() - t0


def _burst(args: argparse.Namespace, model_dir: Path, transfer, runtime, system: str,
           burst: dict, reference: dict) -> dict:
    from lambdascale.bench.scale import run_systems

    rows = asyncio.run(run_systems(model_dir, args.hosts, 1, transfer, runtime, burst, reference, [system]))
    return rows[0]


def run_mode(mode: str, args: argparse.Namespace, model_dir: Path, work: Path, system: str | None = None,
             burst: dict | None = None, reference: dict | None = None) -> float | dict:
    import yaml

    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings
    from tests.multihost.netns import agents_on, emulated_hosts, free_port, write_secret

    with emulated_hosts(args.hosts) as net:
        if mode == "kernel":
            for h in net.hosts:
                h.cap(rate_mbit=args.rate_mbit, delay_ms=args.delay_ms)
        port = free_port(net.root)
        secret = write_secret(work / f"{mode}-{system or 'multicast'}.secret")
        runtime = RuntimeSettings(launcher="external", nodes=args.hosts, controller_bind=net.root,
                                  controller_port=port, secret_file=str(secret), heartbeat_misses=30,
                                  register_timeout_s=300,  # agents importing torch on a loaded 2-core VM
                                  # the source lends stages of the first pipelines (bench/configs/issue6-acceptance.yaml)
                                  pipeline_helper_blocks=2)
        link = None if mode == "kernel" else args.rate_mbit / 1000
        transfer = TransferSettings(link_gbps=link, bucket_burst_bytes=256 << 10, io_slice_bytes=256 << 10)
        cfg = work / f"{mode}-{system or 'multicast'}.yaml"
        cfg.write_text(yaml.safe_dump({"runtime": runtime.model_dump(mode="json"),
                                       "transfer": transfer.model_dump(mode="json")}))
        with agents_on(net, port, cfg, secret):
            if system is not None:
                return _burst(args, model_dir, transfer, runtime, system, burst or {}, reference or {})
            return asyncio.run(_multicast(args.hosts, model_dir, transfer, runtime))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=200.0)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay per host link (kernel row)")
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--burst", type=int, default=0, help="fire this many requests during the scale-out (bench scale)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_netns.py needs root (network namespaces)", file=sys.stderr)
        return 2
    from lambdascale.bench.scale import multicast_bound_s, resolve_model
    from lambdascale.model.manifest import read_manifest

    with tempfile.TemporaryDirectory(prefix="lambdascale-netns-") as tmp:
        work = Path(tmp)
        model_dir = resolve_model(args.model, work / "models", args.layers, 8, 2)
        m = read_manifest(model_dir)
        bound = multicast_bound_s(args.hosts, 1, m.n_chunks, m.total_bytes, args.rate_mbit * 1e6 / 8)
        print(f"{m.name}: {m.total_bytes / 2**20:.1f} MiB, {m.n_chunks} chunks; {args.hosts} hosts, 1 source, "
              f"{args.rate_mbit:g} Mbit/s per host link; bound {bound:.2f} s")
        if args.burst:
            return _burst_table(args, model_dir, work, m, bound)
        print(f"{'cap':26} {'multicast s':>11} {'/ bound':>8}")
        for mode, label in (("kernel", "kernel (tc netem)" if args.delay_ms else "kernel (tc tbf)"),
                            ("python", "python token buckets")):
            t = run_mode(mode, args, model_dir, work)
            print(f"{label:26} {t:>11.2f} {t / bound:>8.2f}", flush=True)
    return 0


def _burst_table(args: argparse.Namespace, model_dir: Path, work: Path, m, bound: float) -> int:
    from lambdascale.bench.scale import make_burst, reference_outputs

    burst = make_burst(args.burst, m.arch.vocab_size, args.max_tokens)
    reference = reference_outputs(model_dir, burst)
    print(f"burst of {args.burst} requests x {args.max_tokens} tokens, 1 source -> {args.hosts - 1} hosts")
    print("| cap | system | TTFT p50 s | TTFT p99 s | all solo s | pipelines | exact |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for mode, label in (("kernel", "kernel (tc)"), ("python", "python buckets")):
        for system in ("lambdascale", "faasnet"):
            r = run_mode(mode, args, model_dir, work, system, burst, reference)
            assert isinstance(r, dict)
            print(f"| {label} | {system} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['all_solo_s']:.2f} | "
                  f"{r['pipelines_formed']} | {r['exact']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
