"""Registry of simulated systems (name -> :class:`System`); one small module per system."""

from __future__ import annotations

from enum import Enum

from lambdascale.errors import LambdaScaleError
from lambdascale.sim.systems import faasnet, keepalive, lambdascale, nccl, serverlessllm
from lambdascale.sim.systems.base import System


class SystemKind(str, Enum):
    LAMBDASCALE = "lambdascale"
    SERVERLESSLLM = "serverlessllm"
    FAASNET = "faasnet"
    NCCL = "nccl"
    KEEPALIVE = "keepalive"


SYSTEMS: dict[SystemKind, System] = {
    SystemKind.LAMBDASCALE: lambdascale.SYSTEM,
    SystemKind.SERVERLESSLLM: serverlessllm.SYSTEM,
    SystemKind.FAASNET: faasnet.SYSTEM,
    SystemKind.NCCL: nccl.SYSTEM,
    SystemKind.KEEPALIVE: keepalive.SYSTEM,
}


def get_systems(names: str | list[str]) -> list[System]:
    """Systems by comma-separated names; the error lists the known ones."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    out = []
    for n in items:
        try:
            out.append(SYSTEMS[SystemKind(n.lower())])
        except ValueError:
            raise LambdaScaleError(f"unknown system {n!r}; systems: {', '.join(k.value for k in SystemKind)}") from None
    if not out:
        raise LambdaScaleError("no system selected")
    return out


__all__ = ["SYSTEMS", "System", "SystemKind", "get_systems"]
