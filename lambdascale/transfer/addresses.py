"""Which local address a listener binds and advertises: a literal address, an interface name, or
``auto`` (the address this host uses to reach a given peer).

A cluster that spans hosts needs every listener on an address the other hosts can reach: the
controller on the gateway host's, each agent's transport on its own host's. ``auto`` asks the
kernel's routing table (a UDP socket "connected" to the peer sends nothing; its local address
is the one the route to the peer leaves from), so on a host with several networks an agent
listens on the network that reaches its controller. An interface name (``eth1``, ``ib0``) pins
one network explicitly. Linux only for interface names (``SIOCGIFADDR``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from lambdascale.errors import LambdaScaleError
from lambdascale.transfer.settings import TransferSettings

AUTO = "auto"
LOOPBACK = "127.0.0.1"
_SIOCGIFADDR = 0x8915


class AddressError(LambdaScaleError):
    """An address setting names no address or interface of this host."""


def interfaces() -> list[str]:
    """This host's network interface names."""
    return [name for _, name in socket.if_nameindex()]


def interface_address(name: str) -> str:
    """The IPv4 address of interface ``name``."""
    if not sys.platform.startswith("linux"):
        raise AddressError(f"interface names ({name!r}) are resolved on Linux only; give an address instead")
    import fcntl

    if name not in interfaces():
        raise AddressError(f"no network interface {name!r} on this host (it has {', '.join(interfaces())})")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    except OSError as e:
        raise AddressError(f"interface {name!r} has no IPv4 address ({e.strerror})") from None
    finally:
        s.close()
    return socket.inet_ntoa(packed[20:24])


def interface_of(address: str) -> str | None:
    """The interface that holds ``address`` (None when none does, or not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    for name in interfaces():
        try:
            if interface_address(name) == address:
                return name
        except AddressError:
            continue
    return None


def route_source(peer_host: str) -> str:
    """The local address the route to ``peer_host`` leaves from (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((peer_host, 9))  # any port: UDP connect only picks the route
        return str(s.getsockname()[0])
    except OSError as e:
        raise AddressError(f"no route from this host to {peer_host} ({e.strerror or e})") from None
    finally:
        s.close()


def resolve(spec: str | None, toward: str | None = None, default: str = LOOPBACK) -> str:
    """The address to bind for ``spec``: None -> ``default``; ``auto`` -> the route source toward
    ``toward`` (``default`` without a peer); an IP literal as given; else an interface name."""
    if spec is None:
        return default
    if spec == AUTO:
        return route_source(toward) if toward is not None else default
    try:
        return str(ipaddress.ip_address(spec))
    except ValueError:
        return interface_address(spec)


def bind_transport(settings: TransferSettings, controller_host: str) -> TransferSettings:
    """``settings`` with ``bind`` and ``advertise`` resolved to address literals for an agent whose
    controller is at ``controller_host`` (what its transport listens on and tells its peers)."""
    bind = resolve(settings.bind, toward=controller_host)
    advertise = settings.advertise
    if advertise is not None:
        advertise = resolve(advertise, toward=controller_host)
    elif bind in ("0.0.0.0", "::"):
        advertise = route_source(controller_host)
    return settings.model_copy(update={"bind": bind, "advertise": advertise or bind})
