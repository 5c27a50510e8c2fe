"""The agent's pipeline stages: form, step, dissolve, and move their KV.

A stage is built straight from the agent's model buffers by a
:class:`~lambdascale.runtime.stage_host.StageHost`, which imports torch: it is loaded in a worker
thread on the first ``FormStage`` (or ``Warmup``) so agents that only move bytes start fast and the
loop keeps heartbeating meanwhile. A stage's input hidden states arrive over the transport tagged
:func:`~lambdascale.runtime.tags.hidden_tag`; a step waits for them (bounded) before it runs. The
node's one accelerator (:class:`~lambdascale.runtime.device.Device`) runs the steps of all its
stages and instances one at a time: two stages here (non-adjacent stages of a pipeline; a pipeline
stage beside a solo instance) never overlap their compute; cross-node stages go first.

This module implements the :class:`~lambdascale.runtime.stage_host.StageContext` a stage host
asks of its agent; the stage host imports none of the agent's modules.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections import deque
from typing import Any

from lambdascale.errors import LambdaScaleError
from lambdascale.runtime.agent_models import ModelBuffers
from lambdascale.runtime.device import Device
from lambdascale.runtime.messages import DissolveStage, ExportKv, FormStage, ImportKv, StageStep
from lambdascale.runtime.tags import hidden_tag
from lambdascale.transfer.base import Arrival, Transport

STAGE_HOST_MODULE = "lambdascale.runtime.stage_host"


class AgentStages:
    """The stages this node hosts, its device, and the hidden states waiting for them."""

    def __init__(self, node: int, transport: Transport, buffers: ModelBuffers, stall_timeout_s: float) -> None:
        self.node = node
        self.transport = transport
        self.buffers = buffers
        self.stall_timeout_s = stall_timeout_s
        self.stages: dict[tuple[str, int], Any] = {}  # (pipeline, stage index) -> StageHost (torch imported lazily)
        self.device = Device()
        #: (start, end, pipeline, stage) of the latest device steps, monotonic seconds (GetStatus)
        self.device_steps: deque[tuple[float, float, str, int]] = deque(maxlen=512)
        self._hidden: dict[str, asyncio.Future[None]] = {}
        self._pipe_model: dict[str, str] = {}  # pipeline -> model of its stages here

    # ---- StageContext (what a StageHost uses) ----------------------------------------------
    def block_view(self, model: str, block: int) -> memoryview:
        return self.buffers.block_view(model, block)

    # ---- hidden states ---------------------------------------------------------------------
    def _hidden_future(self, tag: str) -> asyncio.Future[None]:
        fut = self._hidden.get(tag)
        if fut is None:
            fut = self._hidden[tag] = asyncio.get_running_loop().create_future()
        return fut

    def on_hidden(self, arr: Arrival) -> None:
        """Hidden states for a stage here arrived (the step may not have asked for them yet)."""
        fut = self._hidden_future(arr.tag)
        if not fut.done():
            fut.set_result(None)

    # ---- handlers --------------------------------------------------------------------------
    def _stage(self, pipeline: str, index: int) -> Any:
        host = self.stages.get((pipeline, index))
        if host is None:
            raise LambdaScaleError(f"node {self.node} hosts no stage {index} of pipeline {pipeline!r}")
        return host

    @staticmethod
    async def load_stage_host() -> Any:
        """The stage host module (torch loads in a worker thread: the loop keeps heartbeating)."""
        return await asyncio.to_thread(importlib.import_module, STAGE_HOST_MODULE)

    async def form(self, msg: FormStage) -> dict:
        mod = await self.load_stage_host()
        key = (msg.pipeline, msg.index)
        if key in self.stages:
            raise LambdaScaleError(f"node {self.node} already hosts stage {msg.index} of pipeline {msg.pipeline!r}")
        self.stages[key] = await asyncio.to_thread(mod.StageHost, self, self.buffers.model(msg.model), msg)
        memory = self.buffers.memory
        r = memory.residency(self.buffers.models[msg.model].manifest)
        r.gpu = True  # a stage built from the buffers: the model's device copy
        r.stages.add(msg.pipeline)
        self._pipe_model[msg.pipeline] = msg.model
        memory.touch(msg.model, time.monotonic())
        return {"peer": self.transport.info().model_dump(mode="json")}

    async def step(self, msg: StageStep) -> dict:
        host = self._stage(msg.pipeline, msg.index)
        tag = hidden_tag(msg.pipeline, msg.step, msg.index)
        self.buffers.memory.touch(self._pipe_model.get(msg.pipeline, ""), time.monotonic())
        ready = None if host.stage.first or not msg.seqs else self._hidden_future(tag)
        # with k steps in flight this step's input may queue behind k - 1 others upstream
        wait_s = self.stall_timeout_s * host.slots
        try:
            if ready is not None:
                await asyncio.wait_for(asyncio.shield(ready), wait_s)
            result: dict = await host.step(msg, ready)
            return result
        except asyncio.TimeoutError:
            raise LambdaScaleError(
                f"node {self.node}: no hidden states for pipeline {msg.pipeline!r} step {msg.step} "
                f"within {wait_s:g}s"
            ) from None
        finally:
            self._hidden.pop(tag, None)

    def dissolve(self, msg: DissolveStage) -> dict:
        for key in [k for k in self.stages if k[0] == msg.pipeline]:
            self.stages.pop(key).close()
        model = self._pipe_model.pop(msg.pipeline, None)
        owner = self.buffers.memory.models.get(model) if model is not None else None
        if owner is not None:
            owner.stages.discard(msg.pipeline)
        return {"peer": self.transport.info().model_dump(mode="json")}

    def reset(self) -> int:
        """Drop every stage (the controller forgot them with this node's last incarnation); the
        buffers they were built from stay, labelled as the device copy. Returns how many."""
        n = len(self.stages)
        for pipeline in {p for p, _ in self.stages}:
            self.dissolve(DissolveStage(req=0, pipeline=pipeline))
        for fut in self._hidden.values():
            fut.cancel()
        self._hidden.clear()
        return n

    async def export_kv(self, msg: ExportKv) -> dict:
        host = self._stage(msg.pipeline, msg.index)
        result: dict = await asyncio.to_thread(host.export_kv, msg.seqs, msg.buffer)
        return result

    async def import_kv(self, msg: ImportKv) -> dict:
        host = self._stage(msg.pipeline, msg.index)
        await asyncio.to_thread(host.import_kv, msg.seqs, msg.parts, msg.dtype)
        for name, _ in msg.parts:
            self.transport.unregister(name)
        return {}
