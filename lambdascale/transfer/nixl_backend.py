"""NIXL backend: one-sided RDMA-style writes (send) and reads (fetch) between registered buffers.

Each agent owns a ``nixl_agent``; its serialized metadata (memory keys of every registered
buffer) and the buffers' addresses travel in :class:`PeerInfo` over the control channel. A send
is a one-sided WRITE from the local registered range into the same range of the peer's registered
buffer, carrying a notification (JSON: tag, buffer, range, source node); the receiver polls its
notifications and reports each as an :class:`Arrival`. The receiver's CPU never touches the bytes.
On CPU machines UCX moves DRAM with ``UCX_TLS=cma,self,tcp`` (set here unless already set); on a
GPU cluster the same code registers VRAM and UCX uses GPUDirect RDMA.

NIXL metadata embeds memory keys, so an agent re-publishes its ``PeerInfo`` after registering
buffers and peers re-add it (:meth:`add_peer` notices the change).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from typing import Any

import numpy as np

from lambdascale.errors import TransferError
from lambdascale.tasks import log_failure
from lambdascale.transfer.base import Arrival, BufferInfo, PeerInfo, Transport, TransportKind

log = logging.getLogger(__name__)

os.environ.setdefault("UCX_TLS", "cma,self,tcp")


def _import_nixl() -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TransferError(
            f"the nixl transport needs the 'nixl' package (pip install 'lambdascale[nixl]'): {e}"
        ) from None
    return nixl_agent, nixl_agent_config


class NixlTransport(Transport):
    """Transport over NIXL (UCX backend)."""

    kind = TransportKind.NIXL

    def __init__(self, node: int, settings=None) -> None:
        super().__init__(node, settings)
        self._agent: Any = None
        self._name = f"ls-node{node}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._reg: dict[str, Any] = {}
        self._remote_meta: dict[int, str] = {}  # node -> metadata currently loaded
        self._remote_name: dict[int, str] = {}
        self._poll_task: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        nixl_agent, nixl_agent_config = _import_nixl()
        cfg = nixl_agent_config(enable_prog_thread=True, backends=["UCX"])
        try:
            self._agent = nixl_agent(self._name, cfg)
        except Exception as e:
            raise TransferError(f"node {self.node}: cannot create a NIXL agent: {e}") from None
        for name, arr in self._buffers.items():
            self._register_backend(name, arr)
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_notifs())
        self._poll_task.add_done_callback(log_failure(f"node {self.node}: nixl's notification poller", log))

    def _register_backend(self, name: str, arr: np.ndarray) -> None:
        if self._agent is None:
            return  # registered at start()
        self._reg[name] = self._agent.register_memory([(arr.ctypes.data, arr.nbytes, 0, name)], "DRAM")

    def _unregister_backend(self, name: str, arr: np.ndarray) -> None:
        reg = self._reg.pop(name, None)
        if reg is not None and self._agent is not None:
            self._agent.deregister_memory(reg)

    def info(self) -> PeerInfo:
        if self._agent is None:
            raise TransferError(f"transport of node {self.node} is not started")
        return PeerInfo(
            node=self.node,
            backend=self.kind,
            agent_name=self._name,
            metadata=base64.b64encode(self._agent.get_agent_metadata()).decode(),
            buffers={n: BufferInfo(addr=a.ctypes.data, nbytes=a.nbytes) for n, a in self._buffers.items()},
        )

    def add_peer(self, info: PeerInfo) -> None:
        super().add_peer(info)
        if self._agent is None:
            raise TransferError(f"transport of node {self.node} is not started")
        if self._remote_meta.get(info.node) == info.metadata:
            return
        if info.node in self._remote_name:
            self._agent.remove_remote_agent(self._remote_name.pop(info.node))
        try:
            name = self._agent.add_remote_agent(base64.b64decode(info.metadata))
        except Exception as e:
            raise TransferError(f"node {self.node}: bad NIXL metadata for node {info.node}: {e}") from None
        self._remote_name[info.node] = name.decode() if isinstance(name, bytes) else str(name)
        self._remote_meta[info.node] = info.metadata

    def remove_peer(self, node: int) -> None:
        super().remove_peer(node)
        self._remote_meta.pop(node, None)
        rn = self._remote_name.pop(node, None)
        if rn is not None and self._agent is not None:
            self._agent.remove_remote_agent(rn)

    def _ranges(self, peer: int, name: str, offset: int, length: int, local_role: str, arrow: str,
                remote_role: str) -> tuple[Any, Any]:
        """Checks shared by send and fetch: transport open, range inside our buffer ``name`` and
        inside the peer's registered buffer of the same name; returns (peer info, remote buffer)."""
        if self._closed or self._agent is None:
            raise TransferError(f"transport of node {self.node} is closed or not started")
        info = self._peer(peer)
        self._check_range(name, offset, length, len(self.buffer(name)), local_role)
        rbuf = info.buffers.get(name)
        if rbuf is None:
            raise TransferError(f"node {self.node} {arrow} node {peer}: peer has no buffer {name!r} (have: {sorted(info.buffers)})")
        self._check_range(name, offset, length, rbuf.nbytes, remote_role)
        return info, rbuf

    async def send(self, peer: int, name: str, offset: int, length: int, tag: str, urgent: bool = False) -> None:
        """One-sided WRITE(s) into the peer's buffer; the last carries the notification.

        Uncapped, one WRITE moves the whole range. Under a link cap the range goes in
        ``io_slice_bytes`` WRITEs, each after its grant from the send bucket, so other sends
        (``urgent`` hidden states among them; UCX runs transfers side by side) wait for one
        slice's debt, not a whole chunk's.
        """
        info, rbuf = self._ranges(peer, name, offset, length, f"sender node {self.node}", "->", f"receiver node {peer}")
        where = f"node {self.node} -> node {peer} (nixl {info.agent_name}), tag {tag!r}"
        notif = json.dumps({"tag": tag, "name": name, "offset": offset, "length": length, "src": self.node}).encode()
        step = self.settings.io_slice_bytes if self.send_bucket.rate is not None else length
        pos = 0
        while True:
            n = min(step, length - pos)
            await self.send_bucket.acquire_async(n)
            last = pos + n >= length
            local_addr = self._buffers[name].ctypes.data + offset + pos
            try:
                ldesc = self._agent.get_xfer_descs([(local_addr, n, 0)], "DRAM")
                rdesc = self._agent.get_xfer_descs([(rbuf.addr + offset + pos, n, 0)], "DRAM")
                handle = self._agent.initialize_xfer("WRITE", ldesc, rdesc, self._remote_name[peer],
                                                     notif if last else b"")
                self._agent.transfer(handle)
            except Exception as e:
                raise TransferError(f"{where}: cannot start transfer: {e}") from None
            await self._wait_done(handle, where)
            pos += n
            if last:
                break
        self.bytes_sent += length

    async def fetch(self, peer: int, name: str, offset: int, length: int) -> None:
        """One-sided READ of the peer's registered range into ours; the peer's CPU does nothing."""
        info, rbuf = self._ranges(peer, name, offset, length, f"fetching node {self.node}", "<-", f"node {peer}")
        where = f"node {self.node} <- node {peer} (nixl {info.agent_name}), buffer {name!r}"
        await self.recv_bucket.acquire_async(length)
        try:
            ldesc = self._agent.get_xfer_descs([(self._buffers[name].ctypes.data + offset, length, 0)], "DRAM")
            rdesc = self._agent.get_xfer_descs([(rbuf.addr + offset, length, 0)], "DRAM")
            handle = self._agent.initialize_xfer("READ", ldesc, rdesc, self._remote_name[peer], b"")
            self._agent.transfer(handle)
        except Exception as e:
            raise TransferError(f"{where}: cannot start transfer: {e}") from None
        await self._wait_done(handle, where)
        self.bytes_received += length

    async def _wait_done(self, handle: Any, where: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stall_timeout_s
        try:
            while True:
                state = self._agent.check_xfer_state(handle)
                if state == "DONE":
                    return
                if state == "ERR":
                    raise TransferError(f"{where}: NIXL reported a transfer error (peer gone?)")
                if loop.time() > deadline:
                    raise TransferError(
                        f"{where}: peer stalled, no completion within {self.settings.stall_timeout_s}s "
                        "(transfer.stall_timeout_s)"
                    )
                await asyncio.sleep(self.settings.nixl_poll_s)
        finally:
            try:
                self._agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - a handle of a dead peer may refuse release; nothing to free
                pass

    async def _poll_notifs(self) -> None:
        while True:
            notifs = self._agent.get_new_notifs()
            for msgs in notifs.values():
                for raw in msgs:
                    try:
                        d = json.loads(raw)
                        arrival = Arrival(**d)
                    except (ValueError, TypeError):
                        continue  # not one of ours (e.g. a bare NIXL notification)
                    await self.recv_bucket.acquire_async(arrival.length)
                    self._on_received(arrival)
            await asyncio.sleep(self.settings.nixl_poll_s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
        if self._agent is not None:
            for rn in list(self._remote_name.values()):
                try:
                    self._agent.remove_remote_agent(rn)
                except Exception:  # noqa: BLE001 - best-effort teardown of a peer that may be gone
                    pass
            for name in list(self._reg):
                self._unregister_backend(name, self._buffers[name])
            self._agent = None
