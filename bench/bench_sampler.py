"""Does a seeded request keep its tokens when its logits move in their last bits?

A request's logits depend, in their last bits, on which rows share its batch (multi-threaded BLAS
on a CPU, cuBLAS kernel choice on a GPU). Greedy decoding shrugs that off; a sampler may not.
This compares the engine's sampler (Gumbel-max with per-token keyed noise) against the
inverse-CDF draw it replaced (kept here as the baseline), side by side in one run:

1. pure function: logits of a 151936-token distribution, flat (a random-weight model's: the
   nucleus is most of the vocabulary) or peaked (a trained model's: ~100 tokens), then the same
   logits times (1 + eps * N(0, 1)); how many of 200 draws pick another token, and the cost of
   one draw;
2. end to end: a synthetic qwen2-0.5b-shaped model (``--layers`` layers, float32, default
   numerics, not batch-invariant), a burst of requests each run alone and then all in one batch;
   how many requests' outputs differ (half of them greedy, half sampled).

    python bench/bench_sampler.py [--layers 2] [--burst 24] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from lambdascale.engine import engine as engine_mod
from lambdascale.engine import sampling
from lambdascale.engine.sampling import SamplingParams

Sampler = Callable[[torch.Tensor, SamplingParams, int, int], int]


def inverse_cdf_token(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """The baseline: temperature, top-k, top-p on the sorted distribution, then one uniform draw
    (SplitMix64 of ``(seed, index)``) through the cumulative distribution."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.detach().to("cpu", torch.float64) / params.temperature
    vals, idx = torch.sort(x, descending=True)
    if params.top_k and params.top_k < vals.numel():
        vals, idx = vals[: params.top_k], idx[: params.top_k]
    probs = torch.softmax(vals, dim=0)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=0)
        keep = int(torch.searchsorted(cum, torch.tensor(params.top_p, dtype=cum.dtype))) + 1
        probs, idx = probs[:keep], idx[:keep]
    cum = torch.cumsum(probs, dim=0)
    mask = (1 << 64) - 1
    u = (sampling.splitmix64(sampling.splitmix64(seed & mask) ^ (index & mask)) >> 11) / float(1 << 53)
    pick = min(int(torch.searchsorted(cum, torch.tensor(u * float(cum[-1]), dtype=cum.dtype), right=True)),
               cum.numel() - 1)
    return int(idx[pick])


SAMPLERS: dict[str, Sampler] = {"gumbel-max (ours)": sampling.sample_token, "inverse-cdf": inverse_cdf_token}


def flips(sampler: Sampler, eps: float, params: SamplingParams, scale: float, draws: int = 200) -> tuple[int, float]:
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(151936, generator=g) * scale
    bumped = lg * (1 + torch.randn(lg.shape, generator=g) * eps)
    t = time.perf_counter()
    a = [sampler(lg, params, 17, i) for i in range(draws)]
    per_draw = (time.perf_counter() - t) / draws
    return sum(x != sampler(bumped, params, 17, i) for i, x in enumerate(a)), per_draw


def end_to_end(sampler: Sampler, model_dir: Path, burst: dict) -> tuple[int, int]:
    """(mismatched sampled requests, mismatched greedy requests): each alone vs all in one batch."""
    from lambdascale.engine.engine import Engine
    from lambdascale.engine.settings import EngineSettings

    saved = sampling.sample_token
    sampling.sample_token = sampler  # sample_batch looks it up at call time
    try:
        def make() -> Engine:
            return Engine.from_checkpoint(model_dir, EngineSettings(device="cpu", dtype="float32",
                                                                    max_batch_size=len(burst)))
        e = make()
        alone = {r: [t for o in e.stream(e.resume(st, request_id=r)) for t in o.token_ids] for r, st in burst.items()}
        e = make()
        for r, st in burst.items():
            e.resume(st, request_id=r)
        batched = {r: [t for o in outs for t in o.token_ids] for r, outs in e.run_to_completion().items()}
    finally:
        sampling.sample_token = saved
    bad = [r for r in burst if alone[r] != batched[r]]
    n_sampled = sum(not burst[r].params.greedy for r in bad)
    return n_sampled, len(bad) - n_sampled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--burst", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    assert engine_mod.sample_batch is sampling.sample_batch
    print(f"1. one draw from a 151936-token distribution, 200 draws (date {time.strftime('%Y-%m-%d %H:%M')} UTC)")
    print(f"{'sampler':18} {'logits':7} {'params':26} {'eps':>7} {'draws changed':>13} {'ms / draw':>9}")
    for scale, shape in ((0.5, "flat"), (4.0, "peaked")):
        for params, label in ((SamplingParams(temperature=0.8, top_p=0.95), "temperature 0.8, top_p .95"),
                              (SamplingParams(temperature=1.0, top_k=5000), "temperature 1, top_k 5000"),
                              (SamplingParams(temperature=1.0), "temperature 1")):
            for eps in (1e-7, 1e-6, 1e-5):
                for name, fn in SAMPLERS.items():
                    n, dt = flips(fn, eps, params, scale)
                    print(f"{name:18} {shape:7} {label:26} {eps:>7.0e} {n:>13} {dt * 1e3:>9.2f}")
    from lambdascale.model.importers import import_model
    from lambdascale.bench.scale import make_burst

    with tempfile.TemporaryDirectory(prefix="lambdascale-bench-sampler-") as tmp:
        m = import_model("synthetic:qwen2-0.5b", Path(tmp), layers=args.layers, n_blocks=args.layers, chunks_per_block=1)
        burst = make_burst(args.burst, 151936, args.max_tokens)
        n_greedy = sum(st.params.greedy for st in burst.values())
        print(f"\n2. {args.burst} requests x {args.max_tokens} tokens ({n_greedy} greedy), each alone vs one batch; "
              f"qwen2-0.5b-shaped, {args.layers} layers, float32, default numerics, {torch.get_num_threads()} threads")
        print(f"{'sampler':18} {'sampled requests differing':>26} {'greedy requests differing':>25}")
        for name, fn in SAMPLERS.items():
            s, g = end_to_end(fn, m.dir, burst)
            print(f"{name:18} {s:>26} {g:>25}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
