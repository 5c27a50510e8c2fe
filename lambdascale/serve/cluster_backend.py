"""A :class:`ServingBackend` over the runtime's node agents (first version: static full instances).

``start`` launches ``runtime.nodes`` agents (``LocalCluster``: local processes, or Ray). ``deploy``
loads the model into the host tier of ``max(1, min_instances)`` nodes (never more than are alive)
and forms one single-stage :class:`RemotePipeline` per node, each driven by a
:class:`PipelineServer` (continuous batching on the agent) and a worker task here. Requests wait in
one FIFO per model; a worker admits from it up to its pipeline's ``max_seqs``.

The backend owns every request's token state (prompt, tokens streamed so far, params, seed). When
an agent dies, its instance is dropped and its requests go back to the head of the queue with
that state; another instance prefills prompt + outputs and continues at the same token index, so
the client's stream is exactly an uninterrupted run's. When no instance of the model is left,
every waiting request ends with :class:`BackendUnavailableError` (the gateway's 503).

Not here yet (the runtime's scale-out work, ``runtime/scaleout.py``, and the control loop plug in
at :meth:`ClusterBackend.deploy` / the worker): autoscaling, multicast scale-out and λPipe
pipelines across receivers. ``PipelineServer`` has no per-request abort, so :func:`_drop` removes a
request from it through the same fields ``take`` uses (an adapter to replace when it gains one).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdascale.config import LambdaScaleConfig
from lambdascale.errors import InvalidRequestError, LambdaScaleError
from lambdascale.serve.backend import (
    BackendStatus,
    BackendUnavailableError,
    FinishReason,
    GenerationRequest,
    InstanceInfo,
    InstanceState,
    ModelCapacity,
    ModelNotServedError,
    NodeInfo,
    Tier,
    TokenEvent,
)
from lambdascale.serve.schemas import DeploySpec

log = logging.getLogger("lambdascale.serve.cluster")


class TokenizerCodec:
    """A checkpoint's tokenizer as a :class:`TextCodec` (the agents run token ids only)."""

    def __init__(self, tokenizer: Any, eos: frozenset[int], context_length: int, vocab_size: int) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos
        self.context_length = context_length
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self._tok.encode_chat(messages)


@dataclass
class _Request:
    """The backend's record of one request: its token state and its stream."""

    rid: str
    model: str
    prompt: tuple[int, ...]
    params: Any             # engine SamplingParams
    seed: int
    out: list[int]
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    done: bool = False

    def token_state(self) -> Any:
        from lambdascale.engine.sequence import TokenState

        return TokenState(self.prompt, tuple(self.out), self.params, self.seed)


@dataclass
class _Instance:
    model: str
    node: int
    pipe: Any               # RemotePipeline
    server: Any             # PipelineServer
    task: asyncio.Task[None] | None = None
    alive: bool = True


@dataclass
class _Model:
    name: str
    spec: DeploySpec
    model_dir: Path
    manifest: Any
    codec: TokenizerCodec
    eos: frozenset[int]
    queue: deque[str] = field(default_factory=deque)
    instances: list[_Instance] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


def _drop(server: Any, rid: str) -> None:
    """Remove one request from a PipelineServer and free its KV on the next step (see module doc)."""
    if server.reqs.pop(rid, None) is not None:
        server._release.append(rid)


class ClusterBackend:
    """Serving on node agents; see the module docstring."""

    def __init__(self, config: LambdaScaleConfig, models_dir: str | Path | None = None,
                 n_nodes: int | None = None) -> None:
        self.config = config
        self.models_dir = Path(models_dir) if models_dir is not None else config.paths.models_dir
        self.n_nodes = n_nodes or config.runtime.nodes
        self._lc: Any = None
        self._models: dict[str, _Model] = {}
        self._reqs: dict[str, _Request] = {}
        self._held: dict[int, set[str]] = {}
        self.moves = 0

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        from lambdascale.runtime.launcher import LocalCluster

        self._lc = LocalCluster(self.n_nodes, self.config.transfer, self.config.runtime)
        await self._lc.__aenter__()
        log.info("cluster of %d node agents up", self.n_nodes)

    @property
    def cluster(self) -> Any:
        return self._lc.cluster

    def kill_node(self, node: int) -> None:
        """Fault injection: SIGKILL one agent."""
        self._lc.launcher.kill(node)

    async def close(self) -> None:
        for name in list(self._models):
            await self.undeploy(name)
        if self._lc is not None:
            await self._lc.__aexit__(None, None, None)
            self._lc = None

    # ---- models -----------------------------------------------------------------------------
    async def deploy(self, spec: DeploySpec) -> None:
        if spec.name in self._models:
            self._models[spec.name].spec = spec  # static instances in this version
            return
        from lambdascale.model.checkpoint import find_model
        from lambdascale.model.tokenizer import Tokenizer

        try:
            ckpt = find_model(self.models_dir, spec.name)
            tok = Tokenizer.from_dir(ckpt.tokenizer_dir)
        except LambdaScaleError as e:
            raise ModelNotServedError(str(e)) from None
        arch = ckpt.arch
        eos = {arch.eos_token_id} if isinstance(arch.eos_token_id, int) else set(arch.eos_token_id or [])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        max_len = min(self.config.engine.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        codec = TokenizerCodec(tok, frozenset(eos), max_len, arch.vocab_size)
        m = _Model(spec.name, spec, Path(ckpt.dir), ckpt.manifest, codec, frozenset(eos))
        self._models[spec.name] = m
        want = max(1, spec.min_instances)
        free = sorted(self.cluster.alive(), key=lambda n: len(self._held.get(n, ())))
        for node in free[:want]:
            await self._start_instance(m, node)
        if not m.instances:
            del self._models[spec.name]
            raise BackendUnavailableError(f"no live node could load model {spec.name!r}")

    async def _start_instance(self, m: _Model, node: int) -> None:
        from lambdascale.runtime.messages import HoldModel
        from lambdascale.runtime.pipeline import PipelineServer, RemotePipeline, StagePlacement

        await self.cluster.request(node, HoldModel(req=0, model_dir=str(m.model_dir)))
        self._held.setdefault(node, set()).add(m.name)
        pipe = RemotePipeline(self.cluster, m.manifest, [StagePlacement(node, (0, m.manifest.n_blocks))],
                              max_len=m.codec.context_length, max_seqs=self.config.engine.max_batch_size,
                              max_step_tokens=self.config.engine.max_num_batched_tokens, name=f"{m.name}@{node}")
        await pipe.form()
        inst = _Instance(m.name, node, pipe, PipelineServer(pipe, m.eos, on_token=self._on_token))
        inst.task = asyncio.get_running_loop().create_task(self._worker(m, inst))
        m.instances.append(inst)
        log.info("instance of %s serving on node %d", m.name, node)

    async def undeploy(self, name: str) -> None:
        m = self._models.pop(name, None)
        if m is None:
            return
        for inst in m.instances:
            inst.alive = False
            if inst.task is not None:
                inst.task.cancel()
                await asyncio.gather(inst.task, return_exceptions=True)
            try:
                await inst.pipe.dissolve()
            except Exception:  # the node may be gone already
                pass
        err = BackendUnavailableError(f"model {name!r} was undeployed or the backend closed")
        for r in [r for r in self._reqs.values() if r.model == name]:
            r.events.put_nowait(err)

    def codec(self, model: str) -> TokenizerCodec:
        m = self._models.get(model)
        if m is None:
            raise ModelNotServedError(f"model {model!r} is not deployed on the cluster")
        return m.codec

    # ---- the data path ----------------------------------------------------------------------
    def _on_token(self, rid: str, tok: int) -> None:
        r = self._reqs.get(rid)
        if r is None:
            return
        r.out.append(tok)
        p = r.params
        m = self._models[r.model]
        stop = tok in p.stop_token_ids or (not p.ignore_eos and tok in m.eos)
        length = len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= m.codec.context_length
        reason = FinishReason.STOP if stop else (FinishReason.LENGTH if length else None)
        r.events.put_nowait(TokenEvent(tok, len(r.out) - 1, reason))
        if reason is not None:
            r.done = True

    async def _worker(self, m: _Model, inst: _Instance) -> None:
        srv = inst.server
        while inst.alive:
            while m.queue and len(srv.reqs) < inst.pipe.max_seqs:
                rid = m.queue.popleft()
                r = self._reqs.get(rid)
                if r is not None and not r.done:
                    srv.add(rid, r.token_state())
            if not srv.busy:
                m.wakeup.clear()
                await m.wakeup.wait()
                continue
            try:
                await srv.step()
            except InvalidRequestError as e:  # a prompt that does not fit one step: fail that request only
                budget = inst.pipe.max_step_tokens
                for rid, rq in list(srv.reqs.items()):
                    if len(rq.all_ids) - rq.computed > budget:
                        _drop(srv, rid)
                        if rid in self._reqs:
                            self._reqs[rid].events.put_nowait(InvalidRequestError(str(e)))
                continue
            except LambdaScaleError as e:  # node lost, agent error: the instance is gone
                self._lose(m, inst, e)
                return
            srv.finished.clear()

    def _lose(self, m: _Model, inst: _Instance, err: Exception) -> None:
        """An instance's node died: requeue its requests with their token state, or fail them."""
        inst.alive = False
        if inst in m.instances:
            m.instances.remove(inst)
        self._held.get(inst.node, set()).discard(m.name)
        moved = list(inst.server.take())
        log.warning("instance of %s on node %d lost (%s); %d request(s) to move", m.name, inst.node, err, len(moved))
        if m.instances:
            self.moves += len(moved)
            m.queue.extendleft(reversed(moved))
            m.wakeup.set()
            return
        fail = BackendUnavailableError(f"no instance of model {m.name!r} is left (node {inst.node}: {err})")
        for rid in moved + list(m.queue):
            r = self._reqs.get(rid)
            if r is not None:
                r.events.put_nowait(fail)
        m.queue.clear()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from lambdascale.engine.sampling import SamplingParams

        m = self._models.get(request.model)
        if m is None:
            raise ModelNotServedError(f"model {request.model!r} is not deployed on the cluster")
        if not m.instances:
            raise BackendUnavailableError(f"no instance of model {request.model!r} is left")
        sp = request.sampling
        params = SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                top_k=max(sp.top_k, 0), seed=sp.seed, stop_token_ids=sp.stop_token_ids,
                                ignore_eos=sp.ignore_eos)
        seed = sp.seed if sp.seed is not None else secrets.randbits(63)
        r = _Request(request.request_id, request.model, tuple(request.prompt_ids), params, seed, list(request.output_ids))
        self._reqs[r.rid] = r
        m.queue.append(r.rid)
        m.wakeup.set()
        finished = False
        try:
            while True:
                item = await r.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._reqs.pop(r.rid, None)
            if not finished:
                await self.abort(r.rid)

    async def abort(self, request_id: str) -> None:
        for m in self._models.values():
            if request_id in m.queue:
                m.queue.remove(request_id)
            for inst in m.instances:
                _drop(inst.server, request_id)
        self._reqs.pop(request_id, None)

    # ---- observation ------------------------------------------------------------------------
    def capacity(self, model: str) -> ModelCapacity:
        m = self._models.get(model)
        if m is None:
            return ModelCapacity(0, 0, 0)
        return ModelCapacity(slots=sum(i.pipe.max_seqs for i in m.instances),
                             running=sum(len(i.server.reqs) for i in m.instances), queued=len(m.queue))

    def status(self) -> BackendStatus:
        alive = set(self.cluster.alive()) if self._lc is not None else set()
        return BackendStatus(
            nodes=tuple(NodeInfo(str(n), n in alive, {mm: (Tier.HOST,) for mm in sorted(self._held.get(n, ()))})
                        for n in range(self.n_nodes)),
            instances=tuple(InstanceInfo(i.pipe.name, m.name, InstanceState.FULL, (str(i.node),), len(i.server.reqs))
                            for m in self._models.values() for i in m.instances if i.node in alive),
            queues={m.name: len(m.queue) for m in self._models.values()},
        )
