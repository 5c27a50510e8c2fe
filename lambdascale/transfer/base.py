"""The ``Transport`` interface: move byte ranges of preallocated buffers between node agents.

Model: every agent registers named receive buffers up front (one per execution block, sized from
the manifest). ``send(peer, name, offset, length, tag)`` copies bytes ``[offset, offset+length)``
of the local buffer ``name`` into the *same* range of the peer's buffer ``name``; it returns once
the peer holds the bytes. The receiver learns of each arrival from :attr:`Transport.arrivals`
(an ``asyncio.Queue`` of :class:`Arrival`). Block bytes are never copied on either side: the
sender hands slices of its buffer to the kernel / NIC, the receiver's backend writes straight
into the registered buffer.

Every failure is a :class:`~lambdascale.errors.TransferError` raised within a bounded time
(``connect_timeout_s``, ``stall_timeout_s``): an unknown peer or buffer, a refused connection, a
stalled or vanished peer.

Backends (``tcp``, ``nixl_backend``) import this module; :func:`lambdascale.transfer.factory.make_transport`
picks one by name, so this module never imports them.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lambdascale.errors import TransferError
from lambdascale.ratelimit import TokenBucket, gbps_to_bytes_per_s
from lambdascale.transfer.settings import TransferSettings


class TransportKind(str, Enum):
    """Data-plane backends."""

    TCP = "tcp"
    NIXL = "nixl"


class BufferInfo(BaseModel):
    """Where a registered buffer lives in its owner's memory (needed by one-sided backends)."""

    model_config = ConfigDict(frozen=True)

    addr: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class PeerInfo(BaseModel):
    """What a peer must know to send to an agent; exchanged over the control channel.

    ``metadata`` (base64 NIXL agent metadata) and ``buffers`` change when buffers are registered,
    so agents re-publish their ``PeerInfo`` after preparing buffers.
    """

    model_config = ConfigDict(frozen=True)

    node: int = Field(ge=0)
    backend: TransportKind
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    agent_name: str = ""
    metadata: str = ""
    buffers: dict[str, BufferInfo] = Field(default_factory=dict)


class Arrival(BaseModel):
    """One completed receive: bytes ``[offset, offset+length)`` of buffer ``name`` came from ``src``."""

    model_config = ConfigDict(frozen=True)

    tag: str
    name: str
    offset: int
    length: int
    src: int


class Transport(ABC):
    """Asynchronous point-to-point byte mover with preallocated, named receive buffers.

    Lifecycle: ``await start()`` -> ``register(...)`` buffers -> publish ``info()`` ->
    ``add_peer(...)`` for every peer -> ``send``/``arrivals`` -> ``await close()``.
    One instance per agent; all methods run on one event loop.
    """

    kind: TransportKind

    def __init__(self, node: int, settings: TransferSettings | None = None) -> None:
        self.node = node
        self.settings = settings or TransferSettings()
        rate = gbps_to_bytes_per_s(self.settings.link_gbps) if self.settings.link_gbps else None
        #: caps this agent's outgoing and incoming bytes separately, like a full-duplex NIC
        self.send_bucket = TokenBucket(rate, self.settings.bucket_burst_bytes)
        self.recv_bucket = TokenBucket(rate, self.settings.bucket_burst_bytes)
        self.arrivals: asyncio.Queue[Arrival] = asyncio.Queue()
        self._buffers: dict[str, np.ndarray] = {}
        self._peers: dict[int, PeerInfo] = {}
        #: test hook: tags whose received bytes get one byte flipped (simulated wire corruption)
        self.corrupt_tags: set[str] = set()
        self.bytes_sent = 0
        self.bytes_received = 0

    # ---- buffers ---------------------------------------------------------------------------
    @staticmethod
    def allocate(nbytes: int) -> np.ndarray:
        """A zeroed, *resident* buffer of ``nbytes`` (thread-safe; the fill releases the GIL).

        Touching every page now (like a pinned host pool, which is always resident) keeps page
        faults out of the transfer. With lazily mapped np.zeros pages each received slice faulted
        its pages in the kernel copy, which cost the multicast (many fresh buffers at once on
        shared cores) up to half its throughput (docs/BENCHMARKS.md, Runtime). Hundreds of MB take
        seconds on a busy machine, so agents call this from a worker thread to keep heartbeating.
        """
        if nbytes <= 0:
            raise ValueError(f"buffer size must be > 0 bytes, got {nbytes}")
        arr = np.empty(nbytes, dtype=np.uint8)
        arr.fill(0)
        return arr

    def register(self, name: str, nbytes: int) -> memoryview:
        """Preallocate (zeroed) and register a receive/send buffer of ``nbytes``; returns a view."""
        if nbytes <= 0:
            raise ValueError(f"buffer {name!r}: size must be > 0 bytes, got {nbytes}")
        return self.adopt(name, self.allocate(nbytes))

    def adopt(self, name: str, arr: np.ndarray) -> memoryview:
        """Register a buffer made by :meth:`allocate` (e.g. in a worker thread); returns a view."""
        if name in self._buffers:
            raise TransferError(f"buffer {name!r} is already registered on node {self.node}")
        if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise ValueError(f"buffer {name!r}: need a contiguous 1-D uint8 array")
        self._buffers[name] = arr
        self._register_backend(name, arr)
        return arr.data  # a writable uint8 view of the whole buffer

    def unregister(self, name: str) -> None:
        """Drop a buffer (e.g. a model evicted from this node)."""
        arr = self._buffers.pop(name, None)
        if arr is not None:
            self._unregister_backend(name, arr)

    def has_buffer(self, name: str) -> bool:
        """Whether a buffer ``name`` is registered here."""
        return name in self._buffers

    def buffer(self, name: str) -> memoryview:
        """The registered buffer ``name`` (a writable uint8 view)."""
        try:
            return self._buffers[name].data
        except KeyError:
            raise TransferError(
                f"no buffer {name!r} registered on node {self.node} (have: {sorted(self._buffers)})"
            ) from None

    def buffer_names(self) -> list[str]:
        return sorted(self._buffers)

    def _check_range(self, name: str, offset: int, length: int, nbytes: int, where: str) -> None:
        if offset < 0 or length <= 0 or offset + length > nbytes:
            raise TransferError(
                f"byte range [{offset}, {offset + length}) is outside buffer {name!r} of {nbytes} bytes on {where}"
            )

    # ---- peers -----------------------------------------------------------------------------
    def add_peer(self, info: PeerInfo) -> None:
        """Learn (or refresh) how to reach ``info.node``."""
        if info.backend != self.kind:
            raise TransferError(f"peer node {info.node} speaks {info.backend.value}, this agent {self.kind.value}")
        self._peers[info.node] = info

    def remove_peer(self, node: int) -> None:
        self._peers.pop(node, None)

    def _peer(self, node: int) -> PeerInfo:
        try:
            return self._peers[node]
        except KeyError:
            raise TransferError(f"node {self.node} does not know peer node {node}") from None

    def _on_received(self, arrival: Arrival) -> None:
        """Backends call this once the bytes are in the buffer."""
        self.bytes_received += arrival.length
        if arrival.tag in self.corrupt_tags:
            self.corrupt_tags.discard(arrival.tag)
            self._buffers[arrival.name][arrival.offset] ^= 0xFF
        self.arrivals.put_nowait(arrival)

    # ---- backend API -----------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Open the endpoint (listen socket, NIXL agent)."""

    @abstractmethod
    def info(self) -> PeerInfo:
        """How peers reach this agent, including the current buffers."""

    @abstractmethod
    async def send(self, peer: int, name: str, offset: int, length: int, tag: str, urgent: bool = False) -> None:
        """Copy ``[offset, offset+length)`` of local buffer ``name`` into the peer's buffer ``name``.

        Returns when the peer holds the bytes; raises ``TransferError`` on any failure. ``urgent``:
        a small, latency-bound transfer (a pipeline's hidden states) that must not wait behind a
        bulk transfer to the same peer (tcp sends it on a second connection; it still counts
        against the link cap).
        """

    @abstractmethod
    async def fetch(self, peer: int, name: str, offset: int, length: int) -> None:
        """Pull ``[offset, offset+length)`` of the peer's buffer ``name`` into the same range here.

        One-sided on nixl (a READ: the peer's CPU is not involved); on tcp the peer's endpoint
        serves it. Returns when the bytes are in the local buffer; no :class:`Arrival` is queued
        (the caller knows). Raises ``TransferError`` on any failure.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release sockets / NIXL resources. Idempotent."""

    def _register_backend(self, name: str, arr: np.ndarray) -> None:
        """Backend hook: make ``arr`` reachable by peers (NIXL registers memory)."""

    def _unregister_backend(self, name: str, arr: np.ndarray) -> None:
        """Backend hook, reverse of :meth:`_register_backend`."""

