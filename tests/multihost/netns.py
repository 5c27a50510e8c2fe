"""Several hosts on one machine: network namespaces joined to the root one by veth pairs on a
bridge (root and ``ip`` needed; tests skip with a clear message without them).

``with emulated_hosts(3) as net:`` gives ``net.root`` (the bridge's address, in the root
namespace) and ``net.hosts`` (one :class:`Host` per namespace, each with its own address on the
same /24). Everything is removed on exit, whatever happened. Only these addresses and loopback
are ever used. ``Host.cap(rate_mbit, delay_ms, loss_pct)`` shapes that host's link with the
kernel (``tc``: tbf for a rate, netem for delay and loss) in both directions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

#: a private /24 unlikely to be in use on a CI host; the root namespace takes .1
SUBNET = "10.213.7"


def skip_unless_netns() -> None:
    """Skip the calling test unless this process can create network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root (ip netns); run the suite as root, as CI does")
    if shutil.which("ip") is None:
        pytest.skip("multi-host tests need the `ip` command (iproute2)")


def _run(argv: list[str], ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + argv
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def _ip(*args: str, ns: str | None = None) -> None:
    _run(["ip", *args], ns)


@dataclass
class Host:
    """One emulated host: namespace ``ns``, address ``addr``, root-side link ``veth``."""

    ns: str
    addr: str
    veth: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cap(self, rate_mbit: float | None = None, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Shape this host's link with the kernel, on both ends of its veth pair: ``tbf`` for a rate
        alone, ``netem`` when delay or loss is asked for (a RuntimeError says so where the kernel
        has no netem)."""
        if delay_ms or loss_pct:
            opts = ["netem"]
            if delay_ms:
                opts += ["delay", f"{delay_ms}ms"]
            if loss_pct:
                opts += ["loss", f"{loss_pct}%"]
            if rate_mbit:
                opts += ["rate", f"{rate_mbit}mbit"]
        elif rate_mbit:
            # a 2 ms bucket (at least 64 KiB) and up to 50 ms of queue: smooth at the cap, no drops
            burst = max(64 << 10, int(rate_mbit * 1e6 / 8 * 0.002))
            opts = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]
        else:
            return
        _run(["tc", "qdisc", "replace", "dev", self.veth, "root", *opts])
        _run(["tc", "qdisc", "replace", "dev", "eth0", "root", *opts], self.ns)


@dataclass
class Network:
    bridge: str
    root: str
    hosts: list[Host] = field(default_factory=list)


@contextlib.contextmanager
def emulated_hosts(n: int) -> Iterator[Network]:
    skip_unless_netns()
    tag = f"{os.getpid() % 100000}"
    net = Network(bridge=f"lsb{tag}", root=f"{SUBNET}.1")
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.root}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(n):
            h = Host(ns=f"lsh{tag}-{i}", addr=f"{SUBNET}.{10 + i}", veth=f"lsv{tag}{i}")
            _ip("netns", "add", h.ns)
            net.hosts.append(h)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("link", "set", h.veth, "master", net.bridge, "up")
            _ip("addr", "add", f"{h.addr}/24", "dev", "eth0", ns=h.ns)
            _ip("link", "set", "eth0", "up", ns=h.ns)
            _ip("link", "set", "lo", "up", ns=h.ns)
        yield net
    finally:
        for h in net.hosts:
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
            subprocess.run(["ip", "link", "del", h.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)


def free_port(host: str) -> int:
    """A port free on ``host`` now (for a controller that must listen on a known one)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_secret(path: Path) -> Path:
    """A fresh cluster secret in ``path``, mode 0600 from its creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    return path


@contextlib.contextmanager
def agents_on(net: Network, port: int, config: Path, secret: Path,
              stderr: int | None = subprocess.DEVNULL) -> Iterator[list[subprocess.Popen]]:
    """One ``lambdascale agent`` per host (node i on host i), as a supervisor would start them,
    dialing the controller at ``net.root:port``; killed and reaped on exit."""
    import sys

    procs = [subprocess.Popen(h.exec_argv([sys.executable, "-m", "lambdascale.cli", "agent", "--controller",
                                           f"{net.root}:{port}", "--node", str(i), "--config", str(config),
                                           "--token-file", str(secret)]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
             for i, h in enumerate(net.hosts)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)
