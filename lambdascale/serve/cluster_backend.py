"""A :class:`ServingBackend` over the serving core: the gateway's adapter to the node agents.

``start`` launches ``runtime.nodes`` agents (``LocalCluster``: local processes, or Ray) and a
:class:`~lambdascale.core.core.ServingCore` over them, which runs the controller (observe ->
decide -> act) with itself as the actuator. This module only translates: a deployment's
checkpoint and tokenizer in, OpenAI-side requests to the core's ``submit``/``abort``, the core's
token outputs to :class:`TokenEvent` s, and the core's state to :class:`BackendStatus`. Queues,
dispatch, instances, pipelines, scale-outs, KV moves and memory plans are the core's
(``lambdascale/core/``), the same code ``lambdascale bench scale`` measures.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lambdascale.clock import MonotonicClock
from lambdascale.config import LambdaScaleConfig
from lambdascale.core.core import ServingCore
from lambdascale.core.state import TokenOut
from lambdascale.errors import LambdaScaleError
from lambdascale.serve.backend import (
    BackendStatus,
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
from lambdascale.serve.codec import TokenizerCodec
from lambdascale.serve.schemas import DeploySpec

log = logging.getLogger("lambdascale.serve.cluster")


class ClusterBackend:
    """Serving on node agents through the serving core; see the module docstring."""

    def __init__(self, config: LambdaScaleConfig, models_dir: str | Path | None = None,
                 n_nodes: int | None = None, autoscale: bool = True) -> None:
        self.config = config
        self.models_dir = Path(models_dir) if models_dir is not None else config.paths.models_dir
        self.n_nodes = n_nodes or config.runtime.nodes
        self.autoscale = autoscale
        self.clock = MonotonicClock()
        self._lc: Any = None
        self.core: ServingCore | None = None
        self._codecs: dict[str, TokenizerCodec] = {}

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        from lambdascale.runtime.launcher import LocalCluster

        self._lc = LocalCluster(self.n_nodes, self.config.transfer, self.config.runtime)
        await self._lc.__aenter__()
        self.core = ServingCore(self._lc.cluster, self.config, self.clock, autoscale=self.autoscale)
        await self.core.start()
        log.info("cluster of %d node agents up", self.n_nodes)

    @property
    def cluster(self) -> Any:
        return self._lc.cluster

    def _core(self) -> ServingCore:
        if self.core is None:
            raise LambdaScaleError("the cluster backend is not started")
        return self.core

    def kill_node(self, node: int) -> None:
        """Fault injection: SIGKILL one agent."""
        self._lc.launcher.kill(node)

    def signal_node(self, node: int, sig: int) -> None:
        """Fault injection: send ``sig`` to one agent (SIGSTOP pauses it, SIGCONT continues it)."""
        self._lc.launcher.signal(node, sig)

    async def close(self) -> None:
        if self.core is not None:
            await self.core.close()
        if self._lc is not None:
            await self._lc.__aexit__(None, None, None)
            self._lc = None

    # ---- models -----------------------------------------------------------------------------------
    async def deploy(self, spec: DeploySpec) -> None:
        core = self._core()
        if spec.name not in core.deployments:
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
            gen = ckpt.manifest.generation
            if gen is not None:
                eos.update(gen.eos_token_ids)
            max_len = min(self.config.engine.max_model_len or arch.max_position_embeddings,
                          arch.max_position_embeddings)
            self._codecs[spec.name] = TokenizerCodec(tok, frozenset(eos), max_len, arch.vocab_size,
                                                     gen.sampling() if gen is not None else None)
            model_dir, manifest = Path(ckpt.dir), ckpt.manifest
        else:
            d = core.deployments[spec.name]
            model_dir, manifest, eos, max_len = d.model_dir, d.manifest, set(d.eos), d.max_len
        await core.deploy(spec.name, model_dir, manifest, spec.to_control(), frozenset(eos), max_len)

    async def undeploy(self, name: str) -> None:
        await self._core().undeploy(name)
        self._codecs.pop(name, None)

    def codec(self, model: str) -> TokenizerCodec:
        c = self._codecs.get(model)
        if c is None:
            raise ModelNotServedError(f"model {model!r} is not deployed on the cluster")
        return c

    # ---- the data path ----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        sp = request.sampling
        params = sp.params()
        seed = sp.seed if sp.seed is not None else secrets.randbits(63)
        events: asyncio.Queue[TokenOut | BaseException] = asyncio.Queue()
        core = self._core()
        core.submit(request.model, request.request_id, request.prompt_ids, params, seed, events.put_nowait,
                    request.output_ids)
        finished = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                reason = FinishReason(item.finish.value) if item.finish is not None else None
                yield TokenEvent(item.token_id, item.index, reason, item.logprobs, item.prompt_logprobs)
                if reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                core.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._core().abort(request_id)

    # ---- observation ------------------------------------------------------------------------------
    def capacity(self, model: str) -> ModelCapacity:
        d = self._core().deployments.get(model)
        if d is None:
            return ModelCapacity(0, 0, 0)
        serving = [u for u in d.serving if u.server is not None]
        return ModelCapacity(slots=sum(u.server.pipe.max_seqs for u in serving if u.server is not None),
                             running=sum(len(u.server.reqs) for u in serving if u.server is not None),
                             queued=len(d.queue))

    def _node_tiers(self, n: int) -> dict[str, tuple[Tier, ...]]:
        """Which tiers hold each model on node ``n``, fastest first, from the agent's last report
        (the same holdings the control plane sees); before any report, the models the core put in
        the node's buffers count as host copies."""
        core = self._core()
        if self._lc is None or n not in self.cluster.alive():
            return {}  # a dead node (or a closed cluster) holds nothing anyone may count on
        tiers = core.memory.node_tiers(n, core.clock.now())
        if tiers is None:
            return {m: (Tier.HOST,) for m in sorted(core.memory.held.get(n, ()))}
        order = {Tier.GPU: 0, Tier.HOST: 1, Tier.SSD: 2}
        out: dict[str, set[Tier]] = {}
        for h in tiers[0]:
            out.setdefault(h.model, set()).add(Tier(h.tier.value))
        return {m: tuple(sorted(ts, key=order.__getitem__)) for m, ts in sorted(out.items())}

    def status(self) -> BackendStatus:
        core = self.core
        if core is None:
            return BackendStatus()
        lc = self._lc
        alive = set(lc.cluster.alive()) if lc is not None else set()
        restarts = lc.launcher.restarts() if lc is not None else {}
        st = core.stats

        def node(n: int) -> NodeInfo:
            state, inc = (lc.cluster.state(n).value, lc.cluster.incarnation(n)) if lc is not None else ("dead", 0)
            return NodeInfo(str(n), n in alive, self._node_tiers(n), state, inc, restarts.get(n, 0))

        return BackendStatus(
            nodes=tuple(node(n) for n in range(self.n_nodes)),
            instances=tuple(InstanceInfo(
                u.id, d.name,
                InstanceState.LOADING if u.loading else (InstanceState.PIPELINED if u.pipelined else InstanceState.FULL),
                tuple(str(n) for n in u.nodes), len(u.server.reqs) if u.server is not None else 0)
                for d in core.deployments.values() for u in d.units
                if all(n in alive for n in u.nodes) and core._members_current(u)),
            queues={d.name: len(d.queue) for d in core.deployments.values()},
            bytes_multicast=st.bytes_multicast,
            kv_moves=st.kv_moves,
            kv_bytes_shipped=st.kv_bytes_shipped,
            scale_events=dict(st.scale_events),
            tier_hits=dict(st.tier_hits),
            timeline=tuple(core.controller.timelines)[-50:] if core.controller is not None else (),
        )
