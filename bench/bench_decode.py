"""Decode throughput: our engine vs transformers' generate on the same weights, and batching gain.

Prints a table of tokens/s for
  - ours, one stream (greedy, fixed number of new tokens),
  - transformers ``generate`` on the same weights (same prompt, same token count),
  - ours, C concurrent requests (aggregate tokens/s) through continuous batching.
Each measurement runs ``--repeats`` times interleaved with the others (shared machines are noisy)
and the best run counts. Uses the imported demo model (``smollm2-135m``) when present, else a
synthetic smollm2-135m-shaped model with random weights.

    .venv/bin/python bench/bench_decode.py [--models-dir DIR] [--tokens 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import torch

from lambdascale.model.families import hf_config
from lambdascale.engine.engine import Engine
from lambdascale.engine.sampling import SamplingParams
from lambdascale.engine.settings import EngineSettings
from lambdascale.model.arch import SHAPES


def _load(models_dir: Path | None) -> tuple[str, Engine, dict[str, torch.Tensor]]:
    from lambdascale.model.checkpoint import find_model
    from lambdascale.errors import LambdaScaleError

    settings = EngineSettings(device="cpu", dtype="float32", max_batch_size=16, max_model_len=2048)
    if models_dir is not None:
        try:
            ckpt = find_model(models_dir, "smollm2-135m")
            tensors: dict[str, torch.Tensor] = {}
            for b in range(ckpt.manifest.n_blocks):
                tensors.update(ckpt.block_tensors(b, dtype=torch.float32))
            return "smollm2-135m (imported demo)", Engine.from_tensors(ckpt.arch, tensors, None, settings), tensors
        except LambdaScaleError:
            pass
    from lambdascale.model.llama import expected_shapes

    arch = SHAPES["smollm2-135m"]
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s))
               for n, s in expected_shapes(arch, (0, arch.num_hidden_layers), True, True).items()}
    return "synthetic smollm2-135m shape", Engine.from_tensors(arch, tensors, None, settings), tensors


def _hf(engine: Engine, tensors: dict[str, torch.Tensor]):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**hf_config(engine.arch))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.tie_weights()
    return model.eval()


class Timer:
    """Wall time and this process's CPU time (the latter is robust to other load on the machine)."""

    def __enter__(self) -> "Timer":
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def ours_one(engine: Engine, prompt: list[int], n: int) -> tuple[Timer, list[int]]:
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    with Timer() as t:
        toks = [x for o in engine.generate(prompt, sp) for x in o.token_ids]
    return t, toks


def ours_many(engine: Engine, prompts: list[list[int]], n: int) -> tuple[Timer, int]:
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    with Timer() as t:
        rids = [engine.add_request(p, sp) for p in prompts]
        res = engine.run_to_completion(rids)
    return t, sum(len(o.token_ids) for r in rids for o in res[r])


def hf_one(model, prompt: list[int], n: int) -> tuple[Timer, list[int]]:
    ids = torch.tensor([prompt])
    with Timer() as t, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return t, out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=None, help="where smollm2-135m was imported (default: config default)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both engines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.models_dir is None:
        from lambdascale.config import default_models_dir

        args.models_dir = default_models_dir()
    label, engine, tensors = _load(args.models_dir)
    hf = _hf(engine, tensors)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, engine.arch.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.concurrency)]
    n = args.tokens
    ours_one(engine, prompts[0], 4)  # warm-up both
    hf_one(hf, prompts[0], 4)
    wall = {"hf": float("inf"), "ours": float("inf"), "many": float("inf")}
    cpu = dict(wall)
    agree = None
    tokens = {"hf": n, "ours": n, "many": 0}
    for _ in range(args.repeats):  # interleaved, best of each
        t, a = ours_one(engine, prompts[0], n)
        wall["ours"], cpu["ours"] = min(wall["ours"], t.wall), min(cpu["ours"], t.cpu)
        t, b = hf_one(hf, prompts[0], n)
        wall["hf"], cpu["hf"] = min(wall["hf"], t.wall), min(cpu["hf"], t.cpu)
        agree = a == b
        t, tokens["many"] = ours_many(engine, prompts, n)
        wall["many"], cpu["many"] = min(wall["many"], t.wall), min(cpu["many"], t.cpu)
    print(f"model: {label}; prompt {args.prompt_len} tokens, {n} new tokens each, greedy, float32, "
          f"torch threads {torch.get_num_threads()}, {platform.machine()}, best of {args.repeats}")
    print(f"{'run':<46}{'tok/s wall':>12}{'ratio':>8}{'tok/CPU-s':>12}{'ratio':>8}")
    names = {"hf": "transformers generate, 1 stream", "ours": "lambdascale engine, 1 stream",
             "many": f"lambdascale engine, {args.concurrency} concurrent (aggregate)"}
    for k in ("hf", "ours", "many"):
        w, c = tokens[k] / wall[k], tokens[k] / cpu[k]
        print(f"{names[k]:<46}{w:>12.1f}{w / (n / wall['hf']):>8.2f}{c:>12.1f}{c / (n / cpu['hf']):>8.2f}")
    print(f"{args.concurrency} concurrent / 1 stream: {wall['ours'] / wall['many'] * tokens['many'] / n:.2f}x wall, "
          f"{cpu['ours'] / cpu['many'] * tokens['many'] / n:.2f}x CPU; same greedy tokens as transformers: {agree}")


if __name__ == "__main__":
    main()
