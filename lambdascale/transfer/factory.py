"""Pick a :class:`~lambdascale.transfer.base.Transport` backend by name.

The factory sits above the interface and its backends (``base`` <- ``tcp``, ``nixl_backend`` <-
``factory``), so the interface never imports an implementation. nixl is imported only when asked
for (its package is optional).
"""

from __future__ import annotations

from lambdascale.transfer.base import Transport, TransportKind
from lambdascale.transfer.conn import tls_contexts
from lambdascale.transfer.settings import TransferSettings
from lambdascale.transfer.tcp import TcpTransport


def make_transport(kind: TransportKind | str, node: int, settings: TransferSettings | None = None, *,
                   secret: bytes | None = None) -> Transport:
    """Build backend ``kind`` (``tcp`` or ``nixl``) for agent ``node``; ValueError for any other name.

    ``secret``: the cluster secret every tcp connection proves both ways before a byte lands
    (:mod:`lambdascale.transfer.auth`; None only for transports inside one process). nixl does not
    take it: UCX connects from metadata the agents exchange over the authenticated control channel.
    """
    kind = TransportKind(kind)
    if kind is TransportKind.TCP:
        s = settings or TransferSettings()
        return TcpTransport(node, settings, secret=secret, tls=tls_contexts(s.tls_cert, s.tls_key, s.tls_ca))
    from lambdascale.transfer.nixl_backend import NixlTransport

    return NixlTransport(node, settings)
