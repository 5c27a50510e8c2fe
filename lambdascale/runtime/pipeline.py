"""Controller side of execute-while-load: execution pipelines across agents, and dissolution.

:class:`RemotePipeline` forms stages on agents (stage i on a node that holds blocks
``[b_i, b_{i+1})``) and runs steps: a step's schedule goes to every stage at once, token ids
enter stage 0, hidden states flow stage to stage over the transport, and the last stage returns
one sampled token per sequence. A full instance is a pipeline of one stage.

Micro-batches: a pipeline of k stages keeps up to ``slots`` steps in flight (``microbatches``;
``runtime.pipeline_microbatches``, default one per stage), each over a disjoint set of its
requests, so stage i computes one micro-batch while stage i+1 computes the one before. Without
that a k-stage pipeline does one stage's work at a time: its prefill of a burst takes as long as
a full instance's although each node holds only 1/k of the layers.

:class:`PipelineServer` does continuous batching of requests on one pipeline from their token
state (prompt ids, output ids, sampling params, seed). Because sampling is a pure function of
(logits, params, seed, token index), :meth:`PipelineServer.take` lets requests leave a
dissolving pipeline between steps and :meth:`PipelineServer.add` resume them on a full instance
(the new instance recomputes the KV cache: by prefilling prompt + outputs, or in batch-invariant
mode by replaying the steps, see below): the client's stream is exactly an uninterrupted run's,
no token lost or repeated.

Limits: stop on token ids and ``max_tokens`` only (stop strings need the tokenizer, which lives
in the gateway). On dissolution the KV is recomputed by default; :mod:`lambdascale.runtime.kvmove`
ships it instead when that is cheaper (``take_progress`` + ``add(..., computed=n)``).

Batch-invariant mode (``engine.batch_invariant``, ``RemotePipeline(batch_invariant=True)``): every
stage computes each row independently of the batch (one torch thread, padded projections,
per-sequence attention; docs/arch/engine-numerics.md) and the server cuts prefill chunks by the
request alone (:func:`~lambdascale.engine.scheduler.prefill_chunk_size`, the engine's rule), so a
request's tokens equal a single-node run's bitwise, on a full instance or a pipeline. Recompute
then becomes a *replay*: a resumed request prefills its prompt in those chunks and feeds each
output it already has as one decode step (its sample discarded, nothing streamed again): the very
steps the uninterrupted run took. Cost: one step per output token already generated instead of one
prefill (decode steps of a busy batch, so the extra time is about ``outputs x decode step``).
Outside the mode a resumed request re-prefills prompt + outputs in one step (cheaper, equal up
to the last bit of the logits).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

from lambdascale.engine.sampling import History, Sampled, SamplingParams, TokenLogprobs, prompt_targets
from lambdascale.engine.scheduler import next_step_tokens, prefill_chunk_size
from lambdascale.engine.sequence import TokenState
from lambdascale.errors import InvalidRequestError
from lambdascale.model.manifest import Manifest
from lambdascale.pipe.serving import microbatch_cap, microbatch_slots, pipeline_seqs_for, pipeline_step_tokens
from lambdascale.runtime.cluster import Cluster
from lambdascale.runtime.messages import DissolveStage, FormStage, StageStep


@dataclass(frozen=True)
class StagePlacement:
    """Stage of a pipeline: ``node`` runs blocks ``[blocks[0], blocks[1])``."""

    node: int
    blocks: tuple[int, int]


def check_placements(placements: Sequence[StagePlacement], n_blocks: int) -> None:
    """Stages must tile ``[0, n_blocks)`` in order; a node may run several non-adjacent stages."""
    if not placements:
        raise ValueError("a pipeline needs at least one stage")
    pos = 0
    for p in placements:
        if p.blocks[0] != pos or p.blocks[1] <= p.blocks[0]:
            raise ValueError(f"stage on node {p.node} holds blocks {list(p.blocks)}, expected to start at block {pos}")
        pos = p.blocks[1]
    if pos != n_blocks:
        raise ValueError(f"stages cover blocks [0, {pos}), the model has {n_blocks}")
    nodes = [p.node for p in placements]
    if any(a == b for a, b in zip(nodes, nodes[1:])):
        raise ValueError(f"adjacent stages on one node should be one stage; got nodes {nodes}")


StageDtype = Literal["float32", "bfloat16"]


def pipeline_batch(
    placements: Sequence[StagePlacement], manifest: Manifest, max_seqs: int, max_step_tokens: int,
    rule: str = "kv",
) -> tuple[int, int]:
    """(max_seqs, max_step_tokens) of a pipeline whose full instances take ``max_seqs`` sequences.

    The sequences follow :func:`lambdascale.pipe.serving.pipeline_seqs_for` over the stages'
    layers (``rule="kv"``: as many as the widest stage's KV memory holds; ``"instance"``:
    ``max_seqs``), the step budget :func:`lambdascale.pipe.serving.pipeline_step_tokens` (grown by
    the extra sequences): the simulator's rules too.
    """
    blocks = manifest.blocks
    layers = [(blocks[p.blocks[0]].layers[0], blocks[p.blocks[1] - 1].layers[1]) for p in placements]
    seqs = pipeline_seqs_for(max_seqs, layers, manifest.arch.num_hidden_layers, rule)
    return seqs, pipeline_step_tokens(max_step_tokens, max_seqs, seqs)


class RemotePipeline:
    """Stages on agents, driven step by step, up to ``slots`` steps in flight.

    ``dtype``: what every stage computes in (hidden states cross stages in it too, so a pipeline's
    step equals the one-stage step). ``batch_invariant``: the engine's batch-invariant numerics on
    every stage (``engine.batch_invariant``); the :class:`PipelineServer` then also chunks prefills
    by the request alone. ``microbatches``: steps in flight at most (0: one per stage; 1: one
    step at a time).
    """

    _ids = itertools.count()

    def __init__(self, cluster: Cluster, manifest: Manifest, placements: Sequence[StagePlacement],
                 max_len: int = 512, max_seqs: int = 16, max_step_tokens: int = 512, name: str | None = None,
                 emulate_device: str | None = None, device: str = "cpu", dtype: StageDtype = "float32",
                 batch_invariant: bool = False, microbatches: int = 1) -> None:
        check_placements(placements, manifest.n_blocks)
        self.slots = microbatch_slots(len(placements), microbatches)
        self.device = device
        self.dtype: StageDtype = dtype
        self.batch_invariant = batch_invariant
        self.cluster = cluster
        self.manifest = manifest
        self.placements = list(placements)
        self.max_len = max_len
        self.max_seqs = max_seqs
        self.max_step_tokens = max_step_tokens
        self.name = name or f"p{next(self._ids)}"
        self.emulate_device = emulate_device
        self._step = 0

    @property
    def nodes(self) -> list[int]:
        return [p.node for p in self.placements]

    async def form(self) -> None:
        ps = self.placements
        await asyncio.gather(*(
            self.cluster.request(p.node, FormStage(
                req=0, model=self.manifest.name, pipeline=self.name, index=i, blocks=p.blocks,
                next_node=ps[i + 1].node if i + 1 < len(ps) else None, max_len=self.max_len,
                max_seqs=self.max_seqs, max_step_tokens=self.max_step_tokens, emulate_device=self.emulate_device,
                device=self.device, dtype=self.dtype, batch_invariant=self.batch_invariant, slots=self.slots,
            ))
            for i, p in enumerate(ps)
        ))
        if len(ps) > 1:
            await self.cluster.broadcast_peers()  # one-sided backends need the new buffers' keys

    async def step(self, seqs: list[tuple[str, int, int]], token_ids: list[int],
                   sample: list[tuple[SamplingParams, int, int]], release: Sequence[str] = (),
                   slot: int = 0, history: Sequence[History] | None = None,
                   eos: Sequence[int] = (), prompt_targets: Sequence[Sequence[int] | None] | None = None) -> list[Sampled]:
        """Run one step; returns one draw per sequence (in ``seqs`` order).

        Steps in flight at once must use different ``slot`` values in ``[0, slots)`` and hold
        disjoint sequences (:class:`PipelineServer` sees to both). ``history`` (one per sample)
        and ``eos`` are what the sampler's logit processing reads (penalties, ``min_tokens``).
        """
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the pipeline's {self.slots} slots")
        step = self._step
        self._step += 1
        sample_d = [(asdict(p), seed, idx) for p, seed, idx in sample]
        hist = ([(list(h.prompt_ids) or None, list(h.output_ids) or None) for h in history]
                if history is not None else None)
        last = len(self.placements) - 1
        replies = await asyncio.gather(*(
            self.cluster.request(p.node, StageStep(
                req=0, pipeline=self.name, index=i, step=step, seqs=seqs,
                token_ids=token_ids if i == 0 else None,
                sample=sample_d if i == last else None, release=list(release), slot=slot,
                history=hist if i == last else None, eos=list(eos) if i == last else [],
                prompt_targets=[list(t) if t else None for t in prompt_targets] if i == last and prompt_targets else None,
            ))
            for i, p in enumerate(self.placements)
        ))
        tokens = list(replies[-1].get("tokens", []))
        lps = replies[-1].get("logprobs") or [None] * len(tokens)
        plps = replies[-1].get("prompt_logprobs") or [None] * len(tokens)

        def lp_of(x: list) -> TokenLogprobs:
            return TokenLogprobs(float(x[0]), tuple((int(a), float(b)) for a, b in x[1]))

        return [Sampled(int(t), None if lp is None else lp_of(lp), tuple(lp_of(x) for x in pl) if pl else ())
                for t, lp, pl in zip(tokens, lps, plps)]

    async def dissolve(self) -> None:
        async def one(n: int) -> None:
            try:
                await self.cluster.request(n, DissolveStage(req=0, pipeline=self.name))
            except Exception:  # noqa: BLE001 - a lost node has nothing left to free
                pass
        await asyncio.gather(*(one(n) for n in dict.fromkeys(self.nodes)))


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    out: list[int]
    params: SamplingParams
    seed: int
    computed: int = 0  # tokens whose KV is cached on this pipeline

    @property
    def all_ids(self) -> list[int]:
        return self.prompt + self.out


@dataclass
class _Flight:
    """A step in flight: its (request id, tokens) and hidden-state slot."""

    batch: list[tuple[str, int]]
    slot: int
    ids: int  # token ids sent
    t0: float
    order: int  # start order


@dataclass
class PipelineServer:
    """Continuous batching of token-state requests on one :class:`RemotePipeline`.

    With ``pipe.slots`` > 1 it keeps that many steps in flight, each over its own requests (the
    free slots share the requests not in flight evenly); :meth:`step`
    returns when one of them is done. :meth:`take` and :meth:`take_progress` need none in
    flight: :meth:`drain` first (:meth:`run` drains before it returns, and a :meth:`step` that
    raises has drained).
    """

    pipe: RemotePipeline
    eos_token_ids: frozenset[int] = frozenset()
    on_token: Callable[[str, int], None] | None = None
    #: called just before ``on_token`` with the token's logprobs, for requests that asked for them
    on_logprobs: Callable[[str, TokenLogprobs], None] | None = None
    #: (request, first prompt position, logprobs) for the prompt tokens a step's rows predicted
    on_prompt_logprobs: Callable[[str, int, tuple[TokenLogprobs, ...]], None] | None = None
    reqs: dict[str, _Req] = field(default_factory=dict)
    finished: dict[str, list[int]] = field(default_factory=dict)
    _release: list[str] = field(default_factory=list)
    #: prefill tokens/s measured on this instance's own prefill-only steps (EMA); None until one ran
    prefill_tokens_per_s: float | None = None
    #: batch-invariant replay: output tokens re-fed as decode steps, and how many of their samples
    #: differed from the output already streamed (nonzero: the numerics are not exact)
    replayed_tokens: int = 0
    replay_mismatches: int = 0
    #: seconds of a decode-only step measured on this instance (EMA); None until one ran
    decode_step_s: float | None = None
    #: most steps this server has had in flight at once
    max_in_flight: int = 0
    _flights: dict["asyncio.Task[list[Sampled]]", _Flight] = field(default_factory=dict)
    _started: int = 0

    @property
    def depth(self) -> int:
        """Steps this server keeps in flight at most (the pipeline's hidden-state slots)."""
        return self.pipe.slots

    @property
    def in_flight(self) -> set[str]:
        """Requests whose step is running now."""
        return {rid for f in self._flights.values() for rid, _ in f.batch}

    def add(self, rid: str, state: TokenState, computed: int = 0) -> None:
        """Admit a request from its token state. ``computed`` > 0: its KV for that many tokens was
        already installed on every stage (shipped on dissolution), so it continues from there."""
        if not 0 <= computed < len(state.prompt_ids) + len(state.output_ids):
            raise InvalidRequestError(
                f"request {rid!r}: computed={computed} must be in [0, {len(state.prompt_ids) + len(state.output_ids)})"
            )
        if rid in self.reqs:
            raise InvalidRequestError(f"request id {rid!r} is already on pipeline {self.pipe.name}")
        if len(state.output_ids) >= state.params.max_tokens:
            raise InvalidRequestError(f"request {rid!r} already has max_tokens={state.params.max_tokens} tokens")
        if len(self.reqs) >= self.pipe.max_seqs:
            raise InvalidRequestError(f"pipeline {self.pipe.name} is full ({self.pipe.max_seqs} sequences)")
        self.reqs[rid] = _Req(rid, list(state.prompt_ids), list(state.output_ids), state.params, state.seed, computed)

    def take(self) -> dict[str, TokenState]:
        """Remove every unfinished request and return its token state (for dissolution)."""
        return {rid: st for rid, (st, _) in self.take_progress().items()}

    def take_progress(self) -> dict[str, tuple[TokenState, int]]:
        """Like :meth:`take`, with each request's tokens whose KV the stages hold (to ship it)."""
        if self._flights:
            raise RuntimeError(f"pipeline {self.pipe.name} has {len(self._flights)} step(s) in flight: drain() first")
        out = {r.rid: (TokenState(tuple(r.prompt), tuple(r.out), r.params, r.seed), r.computed) for r in self.reqs.values()}
        self._release.extend(self.reqs)
        self.reqs.clear()
        return out

    def drop(self, rid: str) -> bool:
        """Forget request ``rid`` (an abort); its KV is freed by a later step, once no step of it
        is in flight. Returns whether it was here."""
        if self.reqs.pop(rid, None) is None:
            return False
        self._release.append(rid)
        return True

    @property
    def busy(self) -> bool:
        return bool(self.reqs) or bool(self._flights)

    @property
    def chunk_size(self) -> int | None:
        """Prefill chunk length in batch-invariant mode (the engine's rule); None outside it."""
        if not self.pipe.batch_invariant:
            return None
        return prefill_chunk_size(self.pipe.max_step_tokens, self.pipe.max_seqs)

    def next_tokens(self, r: _Req) -> int:
        """Tokens ``r`` computes in its next step.

        Outside the mode: everything pending (a prompt, or prompt + outputs of a resumed request)
        up to the step budget; a longer prefill takes several steps. In batch-invariant mode: a
        prompt chunk, else one token (a decode, or the replay of an output already known), a
        function of the request alone.
        """
        chunk = self.chunk_size
        if chunk is None:
            return min(len(r.all_ids) - r.computed, self.pipe.max_step_tokens)
        return next_step_tokens(r.computed, len(r.all_ids), len(r.prompt), chunk)

    def plan_step(self, parts: int = 1) -> list[tuple[_Req, int]]:
        """The next step's (request, tokens): single-token steps first, then prefills in admission
        order, within ``max_step_tokens``. In batch-invariant mode a prefill that does not fit the
        budget left waits (it never shrinks, so its chunks do not depend on its neighbours);
        outside it the prefill takes what is left of the budget and continues next step (so a
        long prompt, or a moved request's prompt + outputs, is never starved by decodes). Requests
        in flight wait for their step; ``parts`` steps about to start share the others: this one
        takes at most :func:`~lambdascale.pipe.serving.microbatch_cap` of them
        (``ceil(requests not in flight / parts)``, the simulator's split too)."""
        busy = self.in_flight
        sized = [(r, self.next_tokens(r)) for r in self.reqs.values() if r.rid not in busy]
        ordered = [x for x in sized if x[1] == 1] + [x for x in sized if x[1] > 1]
        batch: list[tuple[_Req, int]] = []
        budget = self.pipe.max_step_tokens
        cap = microbatch_cap(len(sized), max(1, parts))
        shrink = self.chunk_size is None
        for r, n in ordered:
            if len(batch) >= cap or budget == 0:
                break
            if n <= budget:
                batch.append((r, n))
                budget -= n
            elif shrink:
                batch.append((r, budget))
                budget = 0
        if not batch and ordered:
            r, n = ordered[0]
            raise InvalidRequestError(
                f"prompt of {len(r.all_ids)} tokens exceeds the pipeline's step budget {self.pipe.max_step_tokens}"
            )
        return batch

    async def step(self) -> None:
        """Start steps while slots are free, then wait until one of them is done.

        A step: decodes first (one token each), then prefills, within ``max_step_tokens``. A
        request emits (streams) a token only when its step computed its last known token; a
        prompt chunk or a replayed output samples too (the last stage samples every sequence),
        and that sample is dropped: for a replay it is checked against the known output
        (``replay_mismatches`` counts differences: zero when the numerics are batch-invariant).
        If a step fails, the others in flight are waited for (what they computed is kept) and
        the first error is raised: no token of the failed step was delivered, so every request's
        token state is exact.
        """
        self._launch()
        if not self._flights:
            return
        done, _ = await asyncio.wait(list(self._flights), return_when=asyncio.FIRST_COMPLETED)
        err = self._finish(done)
        if err is not None:
            await self.drain(suppress=True)
            raise err

    async def drain(self, suppress: bool = False) -> None:
        """Wait for every step in flight and apply it; starts none. The first error is raised
        after all are done, unless ``suppress``."""
        err: BaseException | None = None
        while self._flights:
            done, _ = await asyncio.wait(list(self._flights))
            e = self._finish(done)
            err = err or e
        if err is not None and not suppress:
            raise err

    async def abandon(self) -> None:
        """Stop every step in flight without applying it (the unit is being torn down): each is
        cancelled and waited for, so none ends with an exception nobody retrieves."""
        tasks = list(self._flights)
        self._flights.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _launch(self) -> None:
        free = sorted(set(range(self.depth)) - {f.slot for f in self._flights.values()})
        for i, slot in enumerate(free):
            batch = self.plan_step(parts=len(free) - i)
            if not batch:
                return
            busy = self.in_flight | {r.rid for r, _ in batch}
            release = [rid for rid in self._release if rid not in busy]  # freed once its step is done
            self._release = [rid for rid in self._release if rid in busy]
            seqs = [(r.rid, r.computed, n) for r, n in batch]
            ids = [t for r, n in batch for t in r.all_ids[r.computed:r.computed + n]]
            # index of the token each step samples: position computed + n, minus the prompt
            sample = [(r.params, r.seed, max(0, r.computed + n - len(r.prompt))) for r, n in batch]
            extra: dict[str, object] = {}
            targets = [prompt_targets(r.prompt, r.computed, n) if r.params.prompt_logprobs is not None else []
                       for r, n in batch]
            if any(targets):
                extra["prompt_targets"] = targets
            if any(r.params.processed for r, _ in batch):  # what logit processing reads travels only then
                extra["history"] = [History(r.prompt if r.params.needs_prompt else (),
                                            r.out[:i] if r.params.needs_output else ())
                                    for (r, _), (_, _, i) in zip(batch, sample)]
                extra["eos"] = sorted(self.eos_token_ids)
            task = asyncio.ensure_future(self.pipe.step(seqs, ids, sample, release, slot=slot, **extra))  # type: ignore[arg-type]
            self._started += 1
            self._flights[task] = _Flight([(r.rid, n) for r, n in batch], slot, len(ids), time.monotonic(), self._started)
            self.max_in_flight = max(self.max_in_flight, len(self._flights))

    def _finish(self, done: set["asyncio.Task[list[Sampled]]"]) -> BaseException | None:
        """Apply finished steps in the order they started; returns the first error."""
        err: BaseException | None = None
        mine = [t for t in done if t in self._flights]  # another drain may have applied some
        for task in sorted(mine, key=lambda t: self._flights[t].order):
            f = self._flights.pop(task)
            if task.cancelled() or task.exception() is not None:
                err = err or (task.exception() if not task.cancelled() else asyncio.CancelledError())
                continue
            self._apply(f, task.result())
        return err

    def _apply(self, f: _Flight, tokens: Sequence[Sampled | int]) -> None:
        took = max(time.monotonic() - f.t0, 1e-6)
        if self.depth == 1 and all(n > 1 for _, n in f.batch):  # prefill-only: this instance's prefill rate
            rate = f.ids / took
            self.prefill_tokens_per_s = rate if self.prefill_tokens_per_s is None else 0.5 * (self.prefill_tokens_per_s + rate)
        elif self.depth == 1 and all(n == 1 for _, n in f.batch):  # decode-only: what one replayed token costs
            self.decode_step_s = took if self.decode_step_s is None else 0.5 * (self.decode_step_s + took)
        for (rid, n), drawn in zip(f.batch, tokens):
            # a stand-in pipe (tests) may answer plain token ids
            t, lps = (drawn.token, drawn.logprobs) if isinstance(drawn, Sampled) else (int(drawn), None)
            r = self.reqs.get(rid)
            if r is None:  # dropped while its step ran: free its KV with the next step
                self._release.append(rid)
                continue
            if isinstance(drawn, Sampled) and drawn.prompt and self.on_prompt_logprobs is not None:
                self.on_prompt_logprobs(rid, r.computed + 1, drawn.prompt)
            r.computed += n
            if r.computed < len(r.all_ids):  # a prompt chunk, or a replayed output: nothing to emit
                idx = r.computed - len(r.prompt)
                if idx >= 0:
                    self.replayed_tokens += 1
                    if r.out[idx] != t:
                        self.replay_mismatches += 1
                continue
            r.out.append(t)
            if lps is not None and self.on_logprobs is not None:
                self.on_logprobs(r.rid, lps)
            if self.on_token is not None:
                self.on_token(r.rid, t)
            stop = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos_token_ids)
            if t in stop or len(r.out) >= r.params.max_tokens or len(r.all_ids) >= self.pipe.max_len:
                self.finished[r.rid] = list(r.out)
                del self.reqs[r.rid]
                self._release.append(r.rid)

    async def run(self, max_steps: int | None = None) -> None:
        """Step until no request is left (or ``max_steps`` steps finished); nothing is in flight
        when it returns."""
        n = 0
        try:
            while self.busy and (max_steps is None or n < max_steps):
                await self.step()
                n += 1
        except BaseException:
            await self.drain(suppress=True)
            raise
        await self.drain()
