"""Agent side of execute-while-load: host one stage of an execution pipeline.

A stage is built straight from the agent's block buffers (the multicast's receive buffers):
``tensors_from_block_bytes`` parses them in place, so forming a stage copies no weights. Hidden
states cross stage boundaries over the agent's transport: stage i copies its output
``[N, hidden]`` into buffer ``pipe/<pipeline>/h<i+1>`` and sends that byte range to the next
stage's buffer of the same name; stage i+1 waits for the arrival tagged with the step number.
The last stage samples with the engine's pure sampler, so a request's tokens depend only on its
token state, whichever nodes computed them. A pipeline keeps up to ``FormStage.slots`` steps
(micro-batches of disjoint sequences) in flight so its stages work at once: each buffer has one
region per slot, and a node's device runs one step at a time, of whichever stage or instance it
hosts (the agent's ``device``, taken once the step's input is there), its emulated-device
floor included. Steps of a pipeline that spans several nodes go first, and may run inside the
emulated wait of a full instance's step (:mod:`lambdascale.runtime.device`). With
``FormStage.batch_invariant`` the stage runs the engine's batch-invariant numerics on one torch
thread: hidden states cross stages in the stage dtype's bytes, so a pipeline's step is bitwise the
one-stage step.

torch is imported here, not by the agent's modules (:mod:`lambdascale.runtime.agent_stages` loads
this one on the first ``FormStage``), so agents that only move bytes start fast. This module
imports none of the agent's modules: it asks of its agent only a :class:`StageContext`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lambdascale.engine.sampling import History, SamplingParams, prompt_token_logprobs, sample_rows
from lambdascale.engine.stage import SeqSlice, Stage, StageBatch
from lambdascale.errors import LambdaScaleError
from lambdascale.model.checkpoint import tensors_from_block_bytes
from lambdascale.model.llama import StageModel
from lambdascale.runtime.device import NORMAL, URGENT, Device
from lambdascale.runtime.tags import hidden_buffer, hidden_tag

if TYPE_CHECKING:
    from lambdascale.runtime.messages import FormStage, StageStep
    from lambdascale.runtime.model_state import ModelState
    from lambdascale.transfer.base import Transport

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class StageContext(Protocol):
    """What a stage host uses of its agent (:class:`~lambdascale.runtime.agent_stages.AgentStages`
    provides it); declared here so this module imports none of the agent's modules."""

    node: int
    transport: "Transport"
    device: Device
    device_steps: "deque[tuple[float, float, str, int]]"

    def block_view(self, model: str, block: int) -> memoryview:
        """The bytes of block ``block`` of ``model`` in the agent's stream buffer."""
        ...


class StageHost:
    """One pipeline stage on this agent: the engine ``Stage`` plus its hidden-state buffers."""

    def __init__(self, agent: StageContext, st: "ModelState", msg: "FormStage") -> None:
        m = st.manifest
        b0, b1 = msg.blocks
        if not 0 <= b0 < b1 <= m.n_blocks:
            raise LambdaScaleError(f"stage blocks [{b0}, {b1}) are outside the model's {m.n_blocks} blocks")
        missing = st.missing_for_blocks(b0, b1)
        if missing:
            raise LambdaScaleError(f"node {agent.node} cannot form a stage of blocks [{b0}, {b1}): chunks {missing} not held")
        self.device = torch.device(msg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LambdaScaleError(f"node {agent.node}: stage asks for device {msg.device} but CUDA is not available")
        tensors: dict[str, torch.Tensor] = {}
        for b in range(b0, b1):
            blk = tensors_from_block_bytes(agent.block_view(m.name, b), f"{m.name} block {b}")
            if self.device.type != "cpu":  # host memory -> accelerator, one block at a time
                blk = {k: v.to(self.device, non_blocking=False) for k, v in blk.items()}
            tensors.update(blk)
        layers = (m.blocks[b0].layers[0], m.blocks[b1 - 1].layers[1])
        self.dtype = _DTYPES[msg.dtype]
        model = StageModel.from_tensors(
            m.arch, tensors, layers=layers, first=b0 == 0, last=b1 == m.n_blocks, dtype=self.dtype, device=self.device,
            source=f"{m.name} blocks [{b0}, {b1}) on node {agent.node}", batch_invariant=msg.batch_invariant,
        )
        self.batch_invariant = msg.batch_invariant
        if msg.batch_invariant and self.device.type == "cpu":
            # multi-threaded BLAS splits a matmul by the batch's row count; StageModel.forward also
            # pins the worker thread that runs each step (OpenMP keeps the setting per OS thread)
            torch.set_num_threads(1)
        self.stage = Stage(model, msg.max_len, msg.max_seqs)
        self.agent = agent
        self.pipeline = msg.pipeline
        self.index = msg.index
        self.next_node = msg.next_node
        self.hidden = m.arch.hidden_size
        self.row_bytes = self.hidden * torch.empty((), dtype=self.dtype).element_size()
        self.slots = msg.slots
        self.slot_bytes = msg.max_step_tokens * self.row_bytes
        nbytes = msg.slots * self.slot_bytes
        self.in_name = hidden_buffer(msg.pipeline, msg.index) if msg.index > 0 else None
        self.out_name = hidden_buffer(msg.pipeline, msg.index + 1) if msg.next_node is not None else None
        for name in (self.in_name, self.out_name):
            if name is not None:
                agent.transport.register(name, nbytes)
        self.max_step_tokens = msg.max_step_tokens
        # one step at a time on this node's device, whichever stage; other nodes wait on the
        # stages of a cross-node pipeline, so those go first
        self.priority = URGENT if msg.index > 0 or msg.next_node is not None else NORMAL
        self.timer = None
        if msg.emulate_device:
            from lambdascale.runtime.emulation import StepTimer, parse_profile

            self.timer = StepTimer.build(parse_profile(msg.emulate_device), layers[1] - layers[0], m.arch.num_hidden_layers)

    async def step(self, msg: "StageStep", hidden_ready: "asyncio.Future[None] | None") -> dict:
        """Run ``msg`` once its input is here (``hidden_ready`` is None for stage 0).

        The node's device lock covers the compute and the emulated floor only: the hidden states
        of step s travel to the next stage while this node computes step s+1.
        """
        if not 0 <= msg.slot < self.slots:
            raise LambdaScaleError(f"step {msg.step} uses slot {msg.slot}; the stage has {self.slots}")
        batch = StageBatch(tuple(SeqSlice(sid, start, n) for sid, start, n in msg.seqs))
        n = batch.num_tokens
        if n > self.max_step_tokens:
            raise LambdaScaleError(f"step of {n} tokens exceeds the stage's max_step_tokens={self.max_step_tokens}")
        base = msg.slot * self.slot_bytes
        if hidden_ready is not None:
            await hidden_ready
        async with self.agent.device.step(self.priority) as dev:
            for sid in msg.release:
                self.stage.release(sid)
            if not msg.seqs:
                return {"tokens": []}
            if self.stage.first:
                if msg.token_ids is None or len(msg.token_ids) != n:
                    raise LambdaScaleError(f"first stage needs {n} token ids, got {msg.token_ids and len(msg.token_ids)}")
                x = torch.tensor(msg.token_ids, dtype=torch.long, device=self.device)  # [N]
            else:
                assert hidden_ready is not None and self.in_name is not None
                raw = np.frombuffer(self.agent.transport.buffer(self.in_name), dtype=np.uint8)[base : base + n * self.row_bytes]
                x = torch.frombuffer(bytearray(raw), dtype=self.dtype).view(n, self.hidden).to(self.device)  # [N, hidden]
            t0 = asyncio.get_running_loop().time()
            busy_from = time.monotonic()
            # every row's logits [N, vocab] when a sequence asks for its prompt's logprobs
            full = self.stage.last and msg.prompt_targets is not None and any(t for t in msg.prompt_targets)
            out = await asyncio.to_thread(self.stage.forward, batch, x, full)
            if self.timer is not None:  # emulated accelerator: the step lasts at least its GPU time
                floor = self.timer.floor_s(sum(s.length for s in batch.seqs if s.length > 1),
                                           sum(1 for s in batch.seqs if s.length == 1))
                rest = floor - (asyncio.get_running_loop().time() - t0)
                if rest > 0:
                    await dev.hold_until(rest)
            if not self.stage.last:
                flat = out.contiguous().cpu().view(torch.uint8).reshape(-1).numpy()  # [N * hidden * itemsize]
            else:
                logits = out.float().cpu()  # [n_seqs, vocab]: the device-to-host copy is device time too
            self.agent.device_steps.append((busy_from, time.monotonic(), self.pipeline, self.index))
        if not self.stage.last:
            assert self.out_name is not None and self.next_node is not None
            np.frombuffer(self.agent.transport.buffer(self.out_name), dtype=np.uint8)[base : base + flat.size] = flat
            await self.agent.transport.send(self.next_node, self.out_name, base, flat.size,
                                            hidden_tag(self.pipeline, msg.step, self.index + 1), urgent=True)
            return {}
        # last stage: out is logits [n_seqs, vocab], or [N, vocab] with every row (``full``)
        assert msg.sample is not None and len(msg.sample) == len(msg.seqs)
        prompt_lps: list[list | None] = []
        if full:
            assert msg.prompt_targets is not None
            if len(msg.prompt_targets) != len(msg.seqs):
                raise LambdaScaleError(f"step {msg.step}: {len(msg.prompt_targets)} prompt targets for {len(msg.seqs)} sequences")
            ends, pos = [], 0
            for (_, _, n), targets, (p, _, _) in zip(msg.seqs, msg.prompt_targets, msg.sample):
                if targets:
                    lps = prompt_token_logprobs(logits[pos:pos + n], targets, int(p.get("prompt_logprobs") or 0))
                    prompt_lps.append([[lp.logprob, [list(t) for t in lp.top]] for lp in lps])
                else:
                    prompt_lps.append(None)
                pos += n
                ends.append(pos - 1)
            logits = logits[ends]  # [n_seqs, vocab]: each sequence's last row samples
        params = [SamplingParams(**p) for p, _, _ in msg.sample]
        if msg.history is not None and len(msg.history) != len(msg.sample):
            raise LambdaScaleError(f"step {msg.step}: {len(msg.history)} histories for {len(msg.sample)} samples")
        hist = [History(pr or (), out or ()) for pr, out in msg.history] if msg.history is not None else None
        # off the event loop: a draw over a large vocabulary takes milliseconds per sampled row
        drawn = await asyncio.to_thread(sample_rows, logits, params, [s for _, s, _ in msg.sample],
                                        [i for _, _, i in msg.sample], hist, msg.eos)
        reply: dict = {"tokens": [d.token for d in drawn]}
        if prompt_lps:
            reply["prompt_logprobs"] = prompt_lps
        if any(d.logprobs is not None for d in drawn):
            reply["logprobs"] = [None if d.logprobs is None else [d.logprobs.logprob, [list(t) for t in d.logprobs.top]]
                                 for d in drawn]
        return reply

    def export_kv(self, seqs: list[str], buffer: str) -> dict:
        """Pack the KV of ``seqs`` into a new transport buffer ``buffer`` (layout: see ``ExportKv``).

        Per sequence, per layer of this stage: K then V, each ``[n_kv_heads, length, head_dim]``
        in the KV cache's dtype, copied to host memory (from the GPU when the stage runs there).
        """
        parts: list[torch.Tensor] = []
        lengths: dict[str, int] = {}
        for sid in seqs:
            if sid not in self.stage.kv:
                raise LambdaScaleError(f"node {self.agent.node}: stage {self.index} of {self.pipeline!r} caches no sequence {sid!r}")
            lengths[sid] = self.stage.cached_len(sid)
            for k, v in self.stage.export_kv(sid):  # each [n_kv, length, head_dim]
                parts += [k.contiguous().cpu().reshape(-1), v.contiguous().cpu().reshape(-1)]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype)
        raw = flat.view(torch.uint8).numpy()  # [bytes]
        view = self.agent.transport.register(buffer, max(1, raw.size))
        np.frombuffer(view, dtype=np.uint8)[: raw.size] = raw
        return {"nbytes": int(raw.size), "layers": self.stage.model.num_layers, "lengths": lengths,
                "dtype": _DTYPE_NAMES[flat.dtype]}

    def import_kv(self, seqs: list[tuple[str, int]], parts: list[tuple[str, int]], dtype: str) -> None:
        """Install KV shipped in ``parts`` (buffer, layers), layer order, for ``seqs`` (id, length)."""
        layers = sum(n for _, n in parts)
        if layers != self.stage.model.num_layers:
            raise LambdaScaleError(
                f"node {self.agent.node}: shipped KV covers {layers} layers, stage {self.index} of "
                f"{self.pipeline!r} has {self.stage.model.num_layers}"
            )
        kv_cache = self.stage.kv
        shape_tail = (kv_cache.n_kv_heads, kv_cache.head_dim)
        src_dtype = _DTYPES[dtype]
        item = torch.empty((), dtype=src_dtype).element_size()
        per_seq: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {sid: [] for sid, _ in seqs}
        for name, n_layers in parts:
            raw = np.frombuffer(self.agent.transport.buffer(name), dtype=np.uint8)
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            pos = 0
            for sid, length in seqs:
                numel = shape_tail[0] * length * shape_tail[1]
                for _ in range(n_layers):
                    k = flat[pos : pos + numel * item].view(src_dtype).view(shape_tail[0], length, shape_tail[1])
                    pos += numel * item
                    v = flat[pos : pos + numel * item].view(src_dtype).view(shape_tail[0], length, shape_tail[1])
                    pos += numel * item
                    per_seq[sid].append((k.to(self.device), v.to(self.device)))
            if pos > raw.size:
                raise LambdaScaleError(f"node {self.agent.node}: KV buffer {name!r} holds {raw.size} bytes, needs {pos}")
        dup = [sid for sid, _ in seqs if sid in self.stage.kv]
        if dup:
            raise LambdaScaleError(f"node {self.agent.node}: sequences {dup} already cached on stage {self.index}")
        installed: list[str] = []
        try:
            for sid, _ in seqs:
                self.stage.import_kv(sid, per_seq[sid])
                installed.append(sid)
        except Exception:  # all or nothing: a failed import leaves no slot taken (the requests recompute)
            for sid in installed:
                self.stage.release(sid)
            raise

    def close(self) -> None:
        for name in (self.in_name, self.out_name):
            if name is not None:
                self.agent.transport.unregister(name)
