"""Pick a :class:`~lambdascale.transfer.base.Transport` backend by name.

The factory sits above the interface and its backends (``base`` <- ``tcp``, ``nixl_backend`` <-
``factory``), so the interface never imports an implementation. nixl is imported only when asked
for (its package is optional).
"""

from __future__ import annotations

from lambdascale.transfer.base import Transport, TransportKind
from lambdascale.transfer.settings import TransferSettings
from lambdascale.transfer.tcp import TcpTransport


def make_transport(kind: TransportKind | str, node: int, settings: TransferSettings | None = None) -> Transport:
    """Build backend ``kind`` (``tcp`` or ``nixl``) for agent ``node``; ValueError for any other name."""
    kind = TransportKind(kind)
    if kind is TransportKind.TCP:
        return TcpTransport(node, settings)
    from lambdascale.transfer.nixl_backend import NixlTransport

    return NixlTransport(node, settings)
