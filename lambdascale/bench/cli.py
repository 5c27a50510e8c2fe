"""``lambdascale bench scale`` and ``lambdascale bench serve``: workloads that drive the product."""

from __future__ import annotations

from typing import Any


def register_bench(bench_subparsers: Any) -> None:
    _register_scale(bench_subparsers)
    _register_serve(bench_subparsers)


def _register_serve(bench_sub: Any) -> None:
    from lambdascale.bench.serve import add_bench_args
    from lambdascale.serve.cli import add_client_args

    b = bench_sub.add_parser("serve", help="replay a trace (or a synthetic bursty profile) against a running gateway")
    add_bench_args(b)
    add_client_args(b)
    b.set_defaults(func=_cmd_serve)


def _cmd_serve(args: Any) -> int:
    import os

    from lambdascale.bench.serve import run_bench_cli
    from lambdascale.serve.cli import default_url

    url = (args.url or default_url()).rstrip("/")
    return run_bench_cli(args, url, args.api_key or os.environ.get("LAMBDASCALE_API_KEY"))


def _register_scale(bench_subparsers: Any) -> None:
    from lambdascale.config import add_config_args

    p = bench_subparsers.add_parser("scale", help="scale a model out across local node agents and time it")
    p.add_argument("--nodes", type=int, default=4, help="node agents, sources included (default: 4)")
    p.add_argument("--sources", type=int, default=1, help="agents that hold the model at the start (default: 1)")
    p.add_argument("--model", default="synthetic:tiny-llama", help="model name in the models dir, or synthetic:SHAPE")
    p.add_argument("--layers", type=int, default=None, help="layers of a synthetic model (default: the shape's)")
    p.add_argument("--algo", default="binomial", choices=["binomial", "faasnet", "ring", "direct"])
    p.add_argument("--scratch", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="import synthetic models into a temporary directory (default: on)")
    p.add_argument("--config", default=None, help="config file (YAML/JSON)")
    p.add_argument("--models-dir", default=None, help="models directory")
    p.add_argument("--transport", dest="cfg__transfer__backend", choices=["tcp", "nixl"], default=None,
                   help="data-plane transport (default: config transfer.backend)")
    add_config_args(p, "transfer", ["link_gbps", "ssd_gbps"])
    add_config_args(p, "runtime", ["emulate_device", "pipeline_helper_blocks", "pipeline_microbatches"])
    add_config_args(p, "engine", ["batch_invariant"])  # every system's stages and the exactness reference
    p.add_argument("--burst", type=int, default=32, help="requests fired as the scale-out starts; 0 skips the systems table (default: 32)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per burst request (default: 16)")
    p.add_argument("--systems", default="lambdascale,faasnet,nccl,local",
                   help="comma-separated systems to compare (default: lambdascale,faasnet,nccl,local)")
    p.add_argument("--max-seqs", type=int, default=8, help="sequences per instance batch (default: 8)")
    p.add_argument("--stage-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype stages and the single-node reference compute in (default: float32)")
    p.add_argument("--also-without-emulation", action="store_true",
                   help="with --emulate-device: rerun the same burst with emulation off, in the same run")
    p.add_argument("--device-arena", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="every agent keeps resident memory for one copy of the model, as a GPU node's memory is "
                        "(runtime.device_arena_gb = the model's size unless the config sets it); "
                        "--no-device-arena makes and touches a fresh buffer during each scale-out (default: on)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the result as JSON to PATH, rewritten as each system finishes (a run cut "
                        "short keeps the systems measured so far)")
    p.set_defaults(func=_cmd_scale)


def _cmd_scale(args: Any) -> int:
    from lambdascale.bench.scale import cmd_bench_scale

    return cmd_bench_scale(args)
