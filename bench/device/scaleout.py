"""GPU check: the `lambdascale bench scale` scale-out with every agent sharing one GPU.

Same code path as ``lambdascale bench scale`` (``lambdascale.bench.scale.run_systems``): a
local cluster of agent processes on 127.0.0.1, the model held in host memory by the sources, a
burst of requests fired as the model is multicast to every other node. The difference: stages
compute on ``--device`` (default cuda when present). When an agent forms a stage (a pipeline
stage during execute-while-load, or a full instance), it copies each of the stage's blocks from
its host buffer (where the multicast put it) to the GPU, block by block; hidden states cross
stages through host memory and the transport.

Checks every output against a single-node reference (an in-process engine on the same device,
float32 like the stages) and prints one table: TTFT p50/p99, last first token, all-solo time,
bytes moved, pipelines formed, exactness. Exit code 1 if any output differs.

``--smoke`` runs the same path on this CPU machine with a tiny synthetic model in well under a
minute (a test runs it). ``--dry-run`` only checks the arguments (the model's layers against
``--blocks``, the systems, the cluster size) and prints the plan: ``run_all.py --check`` runs it on
every script's full-run arguments, so a device session is not spent on a typo. Results go to
``--json`` or, when ``$OUT`` is set, ``$OUT/scaleout.json``, rewritten after each system so a run
cut short by its time limit still leaves the systems it finished.
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
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 3 agents, a few requests")
    ap.add_argument("--model", default="synthetic:qwen2-0.5b", help="synthetic:SHAPE or an imported model name")
    ap.add_argument("--layers", type=int, default=None, help="layers of a synthetic model (default: the shape's own)")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--chunks-per-block", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--sources", type=int, default=1)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--systems", default="lambdascale,faasnet",
                    help="comma list of lambdascale,lambdascale-lend,faasnet,nccl,local (lambdascale-lend: the "
                         "sources run --helper-blocks blocks each of the early pipelines)")
    ap.add_argument("--helper-blocks", type=int, default=2,
                    help="runtime.pipeline_helper_blocks of the lambdascale-lend system")
    ap.add_argument("--link-gbps", type=float, default=None, help="cap each agent's link (Gbit/s); none by default")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "nixl"])
    ap.add_argument("--stage-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype the stages and the reference compute in (float32 keeps GPU kernels' batch "
                         "dependence far below a token's margin)")
    ap.add_argument("--json", default=None, help="write the results here (default $OUT/scaleout.json when $OUT is set)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.layers, args.nodes, args.sources = "synthetic:tiny-llama", None, 3, 1
        args.burst, args.max_tokens, args.max_seqs, args.systems = 4, 6, 2, "lambdascale"
    systems = [s for s in args.systems.split(",") if s]
    problem = check_args(args, systems)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"plan: {args.model} ({args.layers or 'all'} layers, {args.blocks} blocks x {args.chunks_per_block} chunks) "
              f"on {args.nodes} agents, {args.sources} source(s); burst {args.burst} x {args.max_tokens} tokens; "
              f"systems {systems}; link {args.link_gbps or 'uncapped'} Gbit/s; stages {args.stage_dtype}")
        return 0

    import torch

    from lambdascale.bench.scale import make_burst, reference_outputs, resolve_model, run_systems
    from lambdascale.runtime.settings import RuntimeSettings
    from lambdascale.transfer.settings import TransferSettings

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    out = args.json or (os.path.join(os.environ["OUT"], "scaleout.json") if os.environ.get("OUT") else None)
    with tempfile.TemporaryDirectory(prefix="lambdascale-device-scaleout-") as tmp:
        model_dir = resolve_model(args.model, Path(tmp), args.layers, args.blocks, args.chunks_per_block)
        from lambdascale.model.manifest import read_manifest

        manifest = read_manifest(model_dir)
        burst = make_burst(args.burst, manifest.arch.vocab_size, args.max_tokens)
        t0 = time.monotonic()
        ref = reference_outputs(model_dir, burst, device, dtype=args.stage_dtype)
        ref_s = time.monotonic() - t0
        transfer = TransferSettings(backend=args.transport, link_gbps=args.link_gbps)
        runtime = RuntimeSettings(heartbeat_s=1.0)
        result = {
            "device": device, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "torch": torch.__version__, "model": manifest.name, "model_bytes": manifest.total_bytes,
            "n_blocks": manifest.n_blocks, "n_chunks": manifest.n_chunks, "nodes": args.nodes, "sources": args.sources,
            "burst": args.burst, "max_tokens": args.max_tokens, "max_seqs": args.max_seqs, "link_gbps": args.link_gbps,
            "transport": args.transport, "stage_dtype": args.stage_dtype, "reference_s": ref_s, "systems": [],
            "all_exact": True, "finished": False, "wall_s": 0.0,
        }
        print(f"scale-out on {device}{' (' + result['gpu'] + ')' if result['gpu'] else ''}: {manifest.name} "
              f"{manifest.total_bytes / 2**20:.1f} MiB, {manifest.n_blocks} blocks, {manifest.n_chunks} chunks; "
              f"{args.nodes} agents, {args.sources} source(s), burst {args.burst} x {args.max_tokens} tokens, "
              f"link {args.link_gbps or 'uncapped'} Gbit/s, stages {args.stage_dtype}; reference {ref_s:.1f} s", flush=True)
        for system in systems:  # one at a time, so a run cut short keeps what it finished
            lend = system == "lambdascale-lend"
            rt = runtime.model_copy(update={"pipeline_helper_blocks": args.helper_blocks}) if lend else runtime
            rows = asyncio.run(run_systems(model_dir, args.nodes, args.sources, transfer, rt, burst, ref,
                                           ["lambdascale" if lend else system],
                                           max_seqs=args.max_seqs, device=device, dtype=args.stage_dtype))
            for r in rows:
                r["system"] = system
            result["systems"] += rows
            result["all_exact"] = all(r.get("exact", False) for r in result["systems"])
            result["wall_s"] = time.monotonic() - t_start
            if out:
                Path(out).write_text(json.dumps(result, indent=2))
    result["finished"] = True
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    print(f"{'system':16} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'last 1st tok ms':>15} {'all solo ms':>11} "
          f"{'MiB moved':>9} {'pipes':>5} {'1st pipe ms':>11} {'exact':>5}")
    for x in result["systems"]:
        if x.get("failed"):
            print(f"{x['system']:16} FAILED: {x['error']}")
            continue
        pipes = [t for name, t in x["instance_started_s"].items() if name.startswith("pipe")]
        first_pipe = f"{min(pipes) * 1e3:.1f}" if pipes else "-"
        print(f"{x['system']:16} {x['ttft_p50_s'] * 1e3:>11.1f} {x['ttft_p99_s'] * 1e3:>11.1f} "
              f"{x['last_first_token_s'] * 1e3:>15.1f} {x['all_solo_s'] * 1e3:>11.1f} "
              f"{x['bytes_moved'] / 2**20:>9.1f} {x['pipelines_formed']:>5} {first_pipe:>11} {str(x['exact']):>5}")
        if x["mismatched_requests"]:
            print(f"  {x['system']}: outputs differ from the reference for {x['mismatched_requests']}")
    return 0 if result["all_exact"] else 1


def check_args(args: argparse.Namespace, systems: list[str]) -> str | None:
    """Why these arguments cannot run, or None. Reads only the shape registry (no torch work)."""
    known = {"lambdascale", "lambdascale-lend", "faasnet", "nccl", "local"}
    if not systems or set(systems) - known:
        return f"--systems: unknown {sorted(set(systems) - known) or 'empty list'}; known: {sorted(known)}"
    if not 1 <= args.sources < args.nodes:
        return f"--sources must be in [1, nodes-1] = [1, {args.nodes - 1}], got {args.sources}"
    if args.burst < 1 or args.max_tokens < 1 or args.max_seqs < 1:
        return "--burst, --max-tokens and --max-seqs must be >= 1"
    if args.helper_blocks < 0:
        return f"--helper-blocks must be >= 0, got {args.helper_blocks}"
    if args.model.startswith("synthetic:"):
        from lambdascale.errors import LambdaScaleError
        from lambdascale.model.arch import synthetic_arch

        try:
            layers = synthetic_arch(args.model, args.layers).num_hidden_layers
        except LambdaScaleError as e:  # unknown shape (the message lists the known ones), --layers < 1
            return f"--model {args.model}: {e}"
        if not 1 <= args.blocks <= layers:
            return f"--blocks {args.blocks} must be in [1, {layers}] (the model's layers)"
    return None


if __name__ == "__main__":
    sys.exit(main())
