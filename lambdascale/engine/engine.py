"""The engine: continuous batching over a model, one short loop.

``step()`` is schedule -> run -> postprocess:

- :func:`lambdascale.engine.scheduler.schedule` picks decodes and prefill chunks;
- :class:`ModelRunner` runs them through the stages and returns logits of sampling sequences;
- postprocessing samples (pure, seeded), appends tokens, detokenizes incrementally, applies stop
  tokens / stop strings / max tokens / the context limit, frees finished sequences' KV cache
  and returns one :class:`RequestOutput` delta per sampled sequence.

Requests enter with :meth:`Engine.add_request` (text, token ids or chat messages) or
:meth:`Engine.resume` (a :class:`TokenState` from another instance), leave by finishing or by
:meth:`Engine.abort`. :meth:`Engine.stream` is a sync iterator of one request's deltas that
drives the loop; :class:`lambdascale.engine.async_engine.AsyncEngine` runs the loop in a thread
for asyncio callers.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence as Seq

import torch

from lambdascale.engine.runner import ModelRunner
from lambdascale.engine.sampling import (
    History,
    SamplingParams,
    TokenLogprobs,
    prompt_targets,
    prompt_token_logprobs,
    sample_rows,
)
from lambdascale.engine.scheduler import SchedulerOutput, SeqView, prefill_chunk_size, schedule
from lambdascale.engine.sequence import FinishReason, RequestOutput, Sequence, SeqStatus, TokenState
from lambdascale.engine.settings import EngineSettings
from lambdascale.engine.stage import Stage, full_stage, stage_from_checkpoint
from lambdascale.errors import InvalidRequestError
from lambdascale.model.arch import ModelArch
from lambdascale.model.generation import GenerationDefaults
from lambdascale.model.tokenizer import IncrementalDetokenizer, Tokenizer

Prompt = str | Seq[int]


def resolve_device(settings: EngineSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("engine.device=cuda but no CUDA device is available")
    return torch.device(settings.device)


def resolve_dtype(settings: EngineSettings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings.dtype]


def invariant_chunk_size(settings: EngineSettings) -> int:
    """Prefill chunk length in batch-invariant mode: fits the step budget next to a full set of decodes."""
    return prefill_chunk_size(settings.max_num_batched_tokens, settings.max_batch_size)


def _stop_holdback(text: str, stops: Seq[str]) -> int:
    """Characters at the end of ``text`` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Engine:
    """Continuous-batching engine over a pipeline of stages (usually one full-model stage)."""

    def __init__(
        self,
        arch: ModelArch,
        stages: Seq[Stage],
        tokenizer: Tokenizer | None = None,
        settings: EngineSettings | None = None,
        generation: GenerationDefaults | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        #: the checkpoint's generation defaults (the gateway applies them; their end ids end requests here)
        self.generation = generation or GenerationDefaults()
        self.arch = arch
        self.runner = ModelRunner(stages)
        self.tokenizer = tokenizer
        self.max_len = min(st.max_len for st in stages)
        eos: set[int] = set()
        if isinstance(arch.eos_token_id, int):
            eos.add(arch.eos_token_id)
        elif arch.eos_token_id:
            eos.update(arch.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        eos.update(self.generation.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self._seqs: dict[str, Sequence] = {}
        self._waiting: deque[str] = deque()
        self._running: list[str] = []
        # deltas kept for sync streams (only requests someone streams are buffered)
        self._buffers: dict[str, deque[RequestOutput]] = {}
        self._ids = itertools.count()
        self.steps = 0
        # intra-op threads for steps: OpenMP keeps this per OS thread, so a worker thread that
        # runs step() would otherwise fall back to the default (see step())
        self.threads = self.settings.threads or torch.get_num_threads()
        if self.settings.batch_invariant:
            self.threads = 1  # multi-threaded BLAS splits work by the batch's row count
            for st in stages:
                st.model.set_batch_invariant(True)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        arch: ModelArch,
        tensors: Mapping[str, torch.Tensor],
        tokenizer: Tokenizer | None = None,
        settings: EngineSettings | None = None,
    ) -> "Engine":
        """A full-model engine from one canonical state dict."""
        settings = settings or EngineSettings()
        device = resolve_device(settings)
        dtype = resolve_dtype(settings, device)
        max_len = settings.max_model_len or arch.max_position_embeddings
        stage = full_stage(arch, tensors, max_len, settings.max_batch_size, device, dtype)
        return cls(arch, [stage], tokenizer, settings)

    @classmethod
    def from_checkpoint(cls, ckpt: Any, settings: EngineSettings | None = None) -> "Engine":
        """A full-model engine from a ``lambdascale.model.checkpoint.Checkpoint`` (or its dir)."""
        if isinstance(ckpt, (str, Path)):
            from lambdascale.model.checkpoint import Checkpoint

            ckpt = Checkpoint(ckpt)
        settings = settings or EngineSettings()
        device = resolve_device(settings)
        dtype = resolve_dtype(settings, device)
        arch: ModelArch = ckpt.arch
        max_len = settings.max_model_len or arch.max_position_embeddings
        stage = stage_from_checkpoint(
            ckpt, range(ckpt.manifest.n_blocks), max_len, settings.max_batch_size, device, dtype
        )
        tok = Tokenizer.from_dir(ckpt.tokenizer_dir)
        return cls(arch, [stage], tok, settings, ckpt.manifest.generation)

    # ---- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt | None = None, messages: Seq[dict[str, str]] | None = None) -> list[int]:
        """Token ids for a text prompt, token ids, or chat messages (chat template applied)."""
        if messages is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("chat messages need a tokenizer; this engine has none")
            return self.tokenizer.encode_chat(messages)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("a text prompt needs a tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt)
        if prompt is None:
            raise InvalidRequestError("give a prompt or chat messages")
        return [int(t) for t in prompt]

    def _validate(self, ids: list[int], output_ids: Seq[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in itertools.chain(ids, output_ids) if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.arch.vocab_size}")
        n = len(ids) + len(output_ids)
        if n >= self.max_len:
            raise InvalidRequestError(
                f"prompt of {n} tokens does not fit the context limit of {self.max_len} tokens "
                f"(engine.max_model_len / the model's max_position_embeddings)"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none")

    def add_request(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        messages: Seq[dict[str, str]] | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ``InvalidRequestError`` on bad input."""
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt, messages)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return self._add(ids, [], params, seed, request_id)

    def resume(self, state: TokenState, request_id: str | None = None) -> str:
        """Continue a request from its token state (e.g. moved from a dissolving pipeline).

        The prompt and the outputs so far are prefilled to rebuild the KV cache; the next token
        is sampled with the same (seed, index) as the original instance would have used, and
        text already streamed by the original instance is not streamed again. With
        ``engine.batch_invariant`` the KV is rebuilt by *replay* instead (the prompt in its own
        chunks, then each known output as one unsampled decode step: one step per output token
        instead of one prefill), so the continuation is bitwise an uninterrupted run's.
        """
        return self._add(list(state.prompt_ids), list(state.output_ids), state.params, state.seed, request_id)

    def _add(self, ids: list[int], out: list[int], params: SamplingParams, seed: int, rid: str | None) -> str:
        self._validate(ids, out, params)
        rid = rid if rid is not None else f"req-{next(self._ids)}"
        if rid in self._seqs:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        if len(out) >= params.max_tokens:
            raise InvalidRequestError(f"request {rid!r} already has {len(out)} of max_tokens={params.max_tokens}")
        seq = Sequence(rid, ids, params, seed, arrival=next(self._ids))
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, context_ids=ids)
            for t in out:
                if t not in self._stop_ids(params):
                    seq.text += seq.detok.add(t)
            seq.emitted = len(seq.text) - _stop_holdback(seq.text, params.stop)
        seq.output_ids = list(out)
        self._seqs[rid] = seq
        self._waiting.append(rid)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its KV cache; returns its final output (None if unknown/done)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return None
        if request_id in self._waiting:
            self._waiting.remove(request_id)
        if request_id in self._running:
            self._running.remove(request_id)
        self.runner.release(request_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        out = self._output(seq, [], "")
        self._forget(request_id)
        return out

    def _forget(self, rid: str) -> None:
        self._seqs.pop(rid, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def token_state(self, request_id: str) -> TokenState:
        """The portable state of a live request (to move it to another instance)."""
        return self._seqs[request_id].token_state()

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> run -> postprocess. Returns this step's deltas."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        sched = self._schedule()
        if sched.is_empty:
            return []
        tokens = {s.request_id: self._seqs[s.request_id].all_ids[s.start:s.start + s.length] for s in sched.seqs}
        full = frozenset(s.request_id for s in sched.seqs if self._seqs[s.request_id].params.prompt_logprobs is not None
                         and s.start + 1 < len(self._seqs[s.request_id].prompt_ids))
        result = self.runner.execute(sched, tokens, full) if full else self.runner.execute(sched, tokens)
        for s in sched.seqs:
            if s.request_id in result.full_logits:
                q = self._seqs[s.request_id]
                lps = prompt_token_logprobs(result.full_logits[s.request_id], prompt_targets(q.prompt_ids, s.start, s.length),
                                            q.params.prompt_logprobs or 0)
                q.prompt_lps.update({s.start + 1 + k: lp for k, lp in enumerate(lps)})
        self.steps += 1
        for s in sched.seqs:
            self._seqs[s.request_id].num_computed = s.start + s.length
        if not result.request_ids:
            return []
        seqs = [self._seqs[r] for r in result.request_ids]
        hist = [History(q.prompt_ids if q.params.needs_prompt else (), q.output_ids if q.params.needs_output else ())
                for q in seqs]
        new = sample_rows(result.logits, [q.params for q in seqs], [q.seed for q in seqs],
                          [len(q.output_ids) for q in seqs], hist, self.eos_token_ids)
        return [self._postprocess(q, s.token, s.logprobs) for q, s in zip(seqs, new)]

    def _schedule(self) -> SchedulerOutput:
        running = [self._view(r) for r in self._running]
        waiting = [self._view(r) for r in self._waiting]
        s = self.settings
        chunk = invariant_chunk_size(s) if s.batch_invariant else None
        sched = schedule(running, waiting, s.max_batch_size, s.max_num_batched_tokens, chunk)
        for rid in sched.admitted:
            self._waiting.remove(rid)
            self._running.append(rid)
            self._seqs[rid].status = SeqStatus.RUNNING
        return sched

    def _view(self, rid: str) -> SeqView:
        s = self._seqs[rid]
        return SeqView(rid, s.num_computed, s.num_tokens, len(s.prompt_ids) if self.settings.batch_invariant else None)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = frozenset(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def _postprocess(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        """Append ``token``, apply the stop rules, and produce the stream delta."""
        p = seq.params
        seq.output_ids.append(token)
        reason: FinishReason | None = None
        if token in self._stop_ids(p):
            reason, seq.stop_reason = FinishReason.STOP, token
        elif seq.detok is not None:
            old = len(seq.text)
            seq.text += seq.detok.add(token)
            if p.stop:
                reason = self._check_stop_strings(seq, old)
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and seq.num_tokens >= self.max_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if seq.detok is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.detok.flush()  # a held-back incomplete character, if any
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = reason
            self._running.remove(seq.request_id)
            self.runner.release(seq.request_id)
            upto = len(seq.text)
        else:
            upto = len(seq.text) - _stop_holdback(seq.text, p.stop)
        delta = seq.text[seq.emitted:upto] if upto > seq.emitted else ""
        seq.emitted = max(seq.emitted, upto)
        out = self._output(seq, [token], delta, (logprobs,) if logprobs is not None else (),
                           self._prompt_logprobs(seq))
        if seq.finished:
            self._forget(seq.request_id)
        return out

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> tuple[TokenLogprobs, ...]:
        """With a request's first output token: its prompt's logprobs (positions 1..), once all are in."""
        n = len(seq.prompt_ids)
        if len(seq.output_ids) != 1 or seq.params.prompt_logprobs is None or len(seq.prompt_lps) < n - 1:
            return ()
        return tuple(seq.prompt_lps[p] for p in range(1, n))

    def _check_stop_strings(self, seq: Sequence, old_len: int) -> FinishReason | None:
        longest = max(len(s) for s in seq.params.stop)
        lo = max(0, old_len - longest + 1)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, lo)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        seq.text = seq.text[:i]
        seq.stop_reason = s
        return FinishReason.STOP

    def _output(self, seq: Sequence, tokens: list[int], text: str,
                logprobs: tuple[TokenLogprobs, ...] = (), prompt_logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=tuple(tokens),
            text=text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            stop_reason=seq.stop_reason,
            token_state=seq.token_state(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        buf = self._buffers.get(seq.request_id)
        if buf is not None:
            buf.append(out)
        return out

    # ---- sync streaming --------------------------------------------------------------------
    def stream(self, request_id: str) -> Iterator[RequestOutput]:
        """Yield one request's deltas as they are produced, driving the loop.

        Several streams may be interleaved in one thread: each step advances every request and
        deltas of the others are kept for their own streams (from the moment their stream was
        opened). Closing the iterator early aborts the request (its KV cache is freed).
        """
        if request_id not in self._seqs:
            raise InvalidRequestError(f"unknown or finished request id {request_id!r}")
        buf = self._buffers.setdefault(request_id, deque())
        return self._stream(request_id, buf)

    def _stream(self, request_id: str, buf: deque[RequestOutput]) -> Iterator[RequestOutput]:
        done = False
        try:
            while True:
                while buf:
                    out = buf.popleft()
                    yield out
                    if out.finished:
                        done = True
                        return
                if not self.has_unfinished:
                    return
                self.step()
        finally:
            if not done:
                self.abort(request_id)
            self._buffers.pop(request_id, None)

    def generate(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        messages: Seq[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> Iterator[RequestOutput]:
        """Add a request and stream its deltas (sync)."""
        rid = self.add_request(prompt, params, request_id=request_id, messages=messages)
        return self.stream(rid)

    def run_to_completion(self, request_ids: Seq[str] | None = None) -> dict[str, list[RequestOutput]]:
        """Step until the given (default: all) requests finish; every delta per request."""
        want = set(request_ids) if request_ids is not None else set(self._seqs)
        got: dict[str, list[RequestOutput]] = {r: [] for r in want}
        while any(r in self._seqs for r in want) and self.has_unfinished:
            for out in self.step():
                if out.request_id in got:
                    got[out.request_id].append(out)
        return got
