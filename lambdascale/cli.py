"""``lambdascale`` command line.

Subcommands are registered by the package that owns them (``<package>/cli.py`` exposing
``register(subparsers)`` and optionally ``register_bench(bench_subparsers)``), so this file only
dispatches. Handlers import heavy libraries lazily to keep ``lambdascale --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from lambdascale.errors import LambdaScaleError

#: Packages that contribute subcommands, in help order.
_COMMAND_MODULES = (
    "lambdascale.serve.cli",      # serve, deploy, delete, status
    "lambdascale.model.cli",      # import, models
    "lambdascale.engine.cli",     # generate
    "lambdascale.pipe.cli",       # plan
    "lambdascale.sim.cli",        # simulate
    "lambdascale.runtime.cli",    # agent (on hosts of one's own)
    "lambdascale.bench.cli",      # bench scale, bench serve
)


def _cmd_config(args: argparse.Namespace) -> int:
    from lambdascale.config import describe_config, load_config

    if args.file:
        cfg = load_config(args.file)
        print(cfg.model_dump_json(indent=2))
        return 0
    for name, default, doc in describe_config():
        print(f"{name} = {default!r}\n    {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambdascale",
        description="Serverless LLM inference with fast scaling (multicast, execute-while-load, tiered locality).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg = sub.add_parser("config", help="print the configuration tree with defaults and documentation")
    cfg.add_argument("file", nargs="?", help="validate this config file and print the effective tree")
    cfg.set_defaults(func=_cmd_config)
    bench = sub.add_parser("bench", help="benchmarks against a local cluster or gateway")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for mod_name in _COMMAND_MODULES:
        if importlib.util.find_spec(mod_name) is None:
            continue
        mod = importlib.import_module(mod_name)
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
        register_bench = getattr(mod, "register_bench", None)
        if register_bench is not None:
            register_bench(bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lambdascale.config import ConfigError

    try:
        rc = args.func(args)
    except (LambdaScaleError, ConfigError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
