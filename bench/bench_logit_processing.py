"""What the sampler's logit processing costs per draw, and what its token history costs on the wire.

Penalties, ``logit_bias`` and ``min_tokens`` run in ``engine.sampling.process_logits`` before the
keyed Gumbel-max draw, on the CPU, for every sampled row (the agents' last stage and the
in-process engine alike); the agents receive each such row's history (prompt and/or output ids)
in the ``StageStep`` message. Side by side in one run, per vocabulary and history length:

* ms per draw: plain (temperature 0.8, top_p 0.95), with presence + frequency penalties, with all
  of them (repetition penalty over prompt and output, a 300-entry logit_bias, min_tokens);
* bytes of one ``StageStep`` with 8 such rows, against the same step without processing.

    python bench/bench_logit_processing.py [--draws 50]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict

import torch

from lambdascale.engine.sampling import History, SamplingParams, sample_token
from lambdascale.runtime.messages import StageStep


def _ms_per_draw(logits: torch.Tensor, p: SamplingParams, hist: History, draws: int) -> float:
    t0 = time.perf_counter()
    for i in range(draws):
        sample_token(logits, p, 7, i, hist, (2,))
    return (time.perf_counter() - t0) / draws * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    base = SamplingParams(max_tokens=4096, temperature=0.8, top_p=0.95)
    print("| vocab | prompt + output | plain ms | presence+frequency ms | all ms | StageStep bytes plain -> all (8 rows) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for vocab in (49152, 151936):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        bias = tuple((rng.randrange(vocab), rng.uniform(-5, 5)) for _ in range(300))
        pf = SamplingParams(**{**asdict(base), "presence_penalty": 0.5, "frequency_penalty": 0.5})
        full = SamplingParams(**{**asdict(pf), "repetition_penalty": 1.2, "logit_bias": dict(bias).items(),
                                 "min_tokens": 1})
        for n_prompt, n_out in ((256, 64), (2048, 512)):
            hist = History(tuple(rng.randrange(vocab) for _ in range(n_prompt)),
                           tuple(rng.randrange(vocab) for _ in range(n_out)))
            ms = [_ms_per_draw(logits, p, hist, args.draws) for p in (base, pf, full)]
            seqs = [(f"r{i}", n_prompt + n_out, 1) for i in range(8)]
            plain = StageStep(req=0, pipeline="p", index=0, step=0, seqs=seqs,
                              sample=[(asdict(base), 1, n_out)] * 8)
            rich = StageStep(req=0, pipeline="p", index=0, step=0, seqs=seqs, sample=[(asdict(full), 1, n_out)] * 8,
                             history=[(list(hist.prompt_ids), list(hist.output_ids))] * 8, eos=[2])
            print(f"| {vocab} | {n_prompt} + {n_out} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | "
                  f"{len(plain.model_dump_json())} -> {len(rich.model_dump_json())} |")


if __name__ == "__main__":
    main()
