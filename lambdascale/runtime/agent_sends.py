"""The agent's side of a multicast: run send lists, cancel them, verify arriving chunks.

Weights move only over the transport. A :class:`~lambdascale.runtime.messages.SendChunks` list
waits per chunk until this node holds it, then sends it, so forwarding is chunk-level, not
round-level; only held (verified) chunks are ever forwarded. A receiver checks every arriving
chunk's range and xxh64 against the manifest before it marks the chunk held and reports
``ChunkHeld`` (else ``ChunkCorrupt``); with ``transfer.digest`` on, it also checks the chunk's
SHA-256/BLAKE3 digest against the ones the controller sent (:meth:`ChunkSends.expect_digests`),
in a worker thread (both release the GIL). ``CancelSends`` stops one multicast's lists (by run and
epoch); another multicast of the same model runs on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import xxhash

from lambdascale.errors import TransferError
from lambdascale.model.digests import hasher
from lambdascale.runtime.agent_models import ModelBuffers
from lambdascale.runtime.messages import PACE, CancelSends, ChunkCorrupt, ChunkHeld, SendChunks, SendFailed
from lambdascale.runtime.tags import buffer_name, chunk_tag, parse_tag
from lambdascale.transfer.base import Arrival, Transport

Report = Callable[[Any], Awaitable[None]]
log = logging.getLogger("lambdascale.agent")


class ChunkSends:
    """Send lists running on this node, and the check of every chunk arriving here."""

    def __init__(self, node: int, transport: Transport, buffers: ModelBuffers, report: Report,
                 stall_timeout_s: float) -> None:
        self.node = node
        self.transport = transport
        self.buffers = buffers
        self._report = report
        self.stall_timeout_s = stall_timeout_s
        # model -> (multicast run, epoch, task) of its send lists; (model, run) -> last cancelled epoch
        self._tasks: dict[str, list[tuple[int, int, asyncio.Task]]] = {}
        self._cancelled_epoch: dict[tuple[str, int], int] = {}
        # model -> (algorithm, its hex digest function, digest per chunk) under transfer.digest
        self._digests: dict[str, tuple[str, Callable[[Any], str], list[str]]] = {}

    def expect_digests(self, model: str, algo: str, digests: list[str] | None, n_chunks: int) -> None:
        """Check every arriving chunk of ``model`` against ``digests`` too (``algo`` = this node's
        ``transfer.digest``; ``none`` checks xxh64 only). Fails closed: a node told to check digests
        refuses a model that comes without them."""
        if algo == "none":
            return
        if digests is None or len(digests) != n_chunks:
            raise TransferError(f"node {self.node}: transfer.digest = {algo} but the controller sent "
                                f"{'no' if digests is None else len(digests)} digests for {model}'s {n_chunks} chunks "
                                "(the controller and this agent must share transfer.digest)")
        self._digests[model] = (algo, hasher(algo), list(digests))

    def sending(self, model: str) -> bool:
        """Whether a send list of ``model`` is still running."""
        return any(not t.done() for _, _, t in self._tasks.get(model, []))

    def sending_models(self) -> set[str]:
        return {n for n in self._tasks if self.sending(n)}

    def start(self, msg: SendChunks) -> None:
        self.buffers.model(msg.model)  # refused for a model this node does not hold
        task = asyncio.get_running_loop().create_task(self._run(msg.model, msg.sends, msg.epoch, msg.run))
        task.add_done_callback(self._log_failure)
        self._tasks.setdefault(msg.model, []).append((msg.run, msg.epoch, task))

    def _log_failure(self, t: asyncio.Task) -> None:
        """A send list that failed other than by a send (reported as SendFailed): said once, here."""
        if not t.cancelled() and t.exception() is not None:
            log.error("node %d: a send list failed: %r", self.node, t.exception(), exc_info=t.exception())

    async def cancel(self, msg: CancelSends) -> dict:
        """Stop one multicast's lists up to ``msg.epoch``; another multicast of the model runs on."""
        keep = []
        stopping = []
        key = (msg.model, msg.run)
        self._cancelled_epoch[key] = max(msg.epoch, self._cancelled_epoch.get(key, -1))
        for run, ep, t in self._tasks.get(msg.model, []):
            if run == msg.run and ep <= msg.epoch:
                t.cancel()
                stopping.append(t)
            elif not t.done():
                keep.append((run, ep, t))
        if stopping:
            await asyncio.wait(stopping, timeout=self.stall_timeout_s)
        self._tasks[msg.model] = keep
        state = self.buffers.models.get(msg.model)
        return {"held": sorted(state.held) if state else []}

    def cancel_all(self) -> list[asyncio.Task]:
        """Stop every send list (this node's incarnation ended); returns the tasks stopping."""
        out = [t for lst in self._tasks.values() for _, _, t in lst if not t.done()]
        for t in out:
            t.cancel()
        self._tasks.clear()
        return out

    async def _run(self, model: str, sends: list[tuple[int, int]], epoch: int, run: int = 0) -> None:
        st = self.buffers.model(model)
        for chunk, dst in sends:
            # The flag, not only Task.cancel(): on Python 3.11 asyncio.wait_for can swallow a
            # cancellation that races with completion, and the list would run on.
            if epoch <= self._cancelled_epoch.get((model, run), -1):
                return
            await st.event(chunk).wait()
            if epoch <= self._cancelled_epoch.get((model, run), -1):
                return
            if dst == PACE:  # pacing entry: only wait until this node holds the chunk
                continue
            ch = st.manifest.chunk(chunk)
            try:
                await self.transport.send(dst, buffer_name(model), ch.offset, ch.length, chunk_tag(model, chunk))
            except TransferError as e:
                await self._report(SendFailed(node=self.node, model=model, chunk=chunk, dst=dst, epoch=epoch,
                                              error=str(e), run=run))

    async def on_chunk(self, arr: Arrival) -> None:
        """Verify an arrived chunk against the manifest; mark it held and report it, or report it corrupt."""
        model, chunk = parse_tag(arr.tag)
        st = self.buffers.models.get(model)
        if st is None:
            return
        ch = st.manifest.chunk(chunk)
        if arr.name != buffer_name(model) or (arr.offset, arr.length) != (ch.offset, ch.length):
            await self._report(ChunkCorrupt(node=self.node, model=model, chunk=chunk, src=arr.src,
                                            detail=f"{arr.name} range [{arr.offset}, +{arr.length}) is not chunk {chunk}'s"))
            return
        view = self.transport.buffer(arr.name)[arr.offset : arr.offset + arr.length]
        got = xxhash.xxh64(view).hexdigest()
        if got != ch.xxh64:
            await self._report(ChunkCorrupt(node=self.node, model=model, chunk=chunk, src=arr.src,
                                            detail=f"xxh64 {got} != manifest {ch.xxh64}"))
            return
        expect = self._digests.get(model)
        if expect is not None:
            algo, digest, want = expect
            got = await asyncio.to_thread(digest, view)
            if got != want[chunk]:
                await self._report(ChunkCorrupt(node=self.node, model=model, chunk=chunk, src=arr.src,
                                                detail=f"{algo} {got[:16]}... != the controller's {want[chunk][:16]}..."))
                return
        st.mark_held(chunk)
        await self._report(ChunkHeld(node=self.node, model=model, chunk=chunk, src=arr.src))
