"""``lambdascale agent``: one node agent on a host of one's own, started by its supervisor
(systemd, a Kubernetes DaemonSet; docs/deploy.md) instead of by a launcher."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run one node agent that registers with a gateway's controller "
                                     "(runtime.launcher = external)")
    p.add_argument("--controller", required=True, help="HOST:PORT the gateway's controller listens on "
                                                       "(runtime.controller_bind / controller_port there)")
    p.add_argument("--node", type=int, required=True, help="this agent's node id, in [0, runtime.nodes)")
    p.add_argument("--config", default=None, help="config file (YAML/JSON): its runtime and transfer sections "
                                                  "(transfer.bind picks the network this agent listens on)")
    p.add_argument("--token-file", default=None, help="file (mode 0600) holding the cluster secret")
    p.set_defaults(func=_cmd_agent)


def _cmd_agent(args: argparse.Namespace) -> int:
    from lambdascale.config import load_config
    from lambdascale.errors import LambdaScaleError
    from lambdascale.runtime import agent

    host, _, port = args.controller.rpartition(":")
    if not host or not port.isdigit():
        raise LambdaScaleError(f"--controller {args.controller!r}: expected HOST:PORT")
    cfg = load_config(args.config)
    argv = ["--controller", args.controller, "--node", str(args.node),
            "--transfer-json", cfg.transfer.model_dump_json(), "--runtime-json", cfg.runtime.model_dump_json()]
    if args.token_file:
        argv += ["--token-file", args.token_file]
    return agent.main(argv)
