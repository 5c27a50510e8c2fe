"""GPU check: pinned host -> GPU load against the pinned copy ceiling, and execute-while-load.

1. Builds a synthetic model of a registered shape (default llama3-8b, ~16 GB bf16) in our block
   format directly in a pinned host pool (weights generated on the GPU, copied down; no disk).
2. Ceiling: one plain pinned -> device copy of the same bytes (best of --repeat).
   Ours: ``lambdascale.store.loader.copy_to_device`` (chunked, side stream, per-block events).
3. Execute-while-load (EWL) on one GPU: all block copies are queued on a copy stream; the compute
   stream waits for block b's event, then runs block b while later blocks still copy. Against
   load-then-run (wait for every block, then run). Both prefill the same prompt and then decode
   greedily; the tokens must be identical. Time to first token is compared.

The forward is a minimal Llama forward written here (RMSNorm, rotate-half RoPE, GQA via SDPA,
SwiGLU), with no KV cache (decode recomputes the sequence: fine for a handful of tokens).

--smoke runs the same code on a tiny shape (CPU or GPU) in a second or two; a test runs it.
--dry-run only checks the arguments (the shape exists, --blocks fits its layers) and prints the plan.
Prints a table; exit code 1 if the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lambdascale.model.arch import ModelArch, get_shape, plan_blocks
from lambdascale.model.checkpoint import _header_bytes, block_tensor_shapes, tensors_from_block_bytes
from lambdascale.store.loader import copy_to_device, enqueue_copies
from lambdascale.store.pool import HostPool


def build_model_in_pool(arch: ModelArch, n_blocks: int, dtype: torch.dtype, gen_device: torch.device,
                        pinned: bool, seed: int = 0) -> tuple[HostPool, list[tuple[int, torch.Tensor]]]:
    """Lay every block out in our format inside one host pool and fill it with N(0, 0.02) weights
    (norms 1), generated on ``gen_device``. Returns the pool and ``(block, uint8 bytes)`` pairs."""
    ranges = plan_blocks(arch.num_hidden_layers, n_blocks)
    layouts = []
    for b, layers in enumerate(ranges):
        shapes = block_tensor_shapes(arch, layers, b == 0, b == n_blocks - 1)
        meta = {k: torch.empty(v, dtype=dtype, device="meta") for k, v in shapes.items()}
        header = _header_bytes(meta)
        nbytes = len(header) + sum(t.numel() * t.element_size() for t in meta.values())
        layouts.append((header, nbytes))
    pool = HostPool(sum(-(-n // 4096) * 4096 for _, n in layouts), pinned=pinned)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    out = []
    for b, (header, nbytes) in enumerate(layouts):
        a = pool.alloc(nbytes)
        buf = pool.tensor(a)
        buf[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for name, t in tensors_from_block_bytes(buf).items():
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.copy_((torch.randn(t.shape, generator=g, device=gen_device) * 0.02).to(dtype))
        out.append((b, buf))
    return pool, out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, d]; cos/sin: [T, d]. HF rotate-half convention."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def run_block(arch: ModelArch, b: int, n_blocks: int, layers: tuple[int, int], w: dict[str, torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    """One execution block on a sequence. x: token ids [T] (block 0) or hidden [T, H]; returns
    hidden [T, H], or logits [T, V] for the last block."""
    if b == 0:
        x = F.embedding(x, w["model.embed_tokens.weight"])           # [T, H]
    T = x.shape[0]
    d = arch.dim_per_head
    nh, nkv = arch.num_attention_heads, arch.num_key_value_heads
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # [T, d]
    for i in range(*layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], arch.rms_norm_eps)
        q = F.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
        k = F.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
        v = F.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
        q = rope(q.view(T, nh, d).transpose(0, 1), cos, sin)           # [nh, T, d]
        k = rope(k.view(T, nkv, d).transpose(0, 1), cos, sin)          # [nkv, T, d]
        v = v.view(T, nkv, d).transpose(0, 1)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # [nh, T, d]
        x = x + F.linear(a.transpose(0, 1).reshape(T, nh * d), w[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], arch.rms_norm_eps)
        x = x + F.linear(F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                         w[p + "mlp.down_proj.weight"])
    if b == n_blocks - 1:
        x = F.linear(rms_norm(x, w["model.norm.weight"], arch.rms_norm_eps), w["lm_head.weight"])  # [T, V]
    return x


def greedy(arch: ModelArch, blocks: list[dict[str, torch.Tensor]], ranges: list[tuple[int, int]],
           ids: torch.Tensor, n: int) -> list[int]:
    out = []
    for _ in range(n):
        x = ids
        for b, w in enumerate(blocks):
            x = run_block(arch, b, len(blocks), ranges[b], w, x)
        nxt = int(x[-1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt], device=ids.device)])
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, seconds, runs on CPU too")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.blocks, args.prompt_len, args.repeat = "tiny-llama", 4, 16, 2
    try:
        layers = args.layers or get_shape(args.shape).num_hidden_layers
    except Exception as e:  # unknown shape: the registry's message names the known ones
        print(f"--shape {args.shape}: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.blocks <= layers or args.repeat < 1 or args.tokens < 1 or args.prompt_len < 1:
        print(f"--blocks must be in [1, {layers}] and --repeat, --tokens, --prompt-len >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"plan: {args.shape} ({layers} layers) in {args.blocks} blocks, prompt {args.prompt_len}, "
              f"{args.tokens} tokens, best of {args.repeat}")
        return 0
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    arch = get_shape(args.shape)
    if args.layers:
        arch = arch.with_layers(args.layers)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ranges = plan_blocks(arch.num_hidden_layers, args.blocks)
    t0 = time.perf_counter()
    pool, sources = build_model_in_pool(arch, args.blocks, dtype, dev, pinned=dev.type == "cuda")
    total = sum(s.numel() for _, s in sources)
    print(f"{args.shape} ({arch.num_hidden_layers} layers), {args.blocks} blocks, {total / 1e9:.2f} GB {dtype}, "
          f"host pool pinned={pool.pinned}, built in {time.perf_counter() - t0:.1f} s, device {dev}")

    # ---- ceiling: one plain copy of the same pinned bytes -----------------------------------
    flat_src = pool.buffer[: sum(-(-s.numel() // 4096) * 4096 for _, s in sources)]
    flat_dst = torch.empty(flat_src.numel(), dtype=torch.uint8, device=dev)
    dests: dict[int, torch.Tensor] = {b: torch.empty(s.numel(), dtype=torch.uint8, device=dev) for b, s in sources}
    best_ceiling = best_ours = float("inf")
    for _ in range(args.repeat):
        sync(dev)
        t = time.perf_counter()
        flat_dst.copy_(flat_src, non_blocking=True)
        sync(dev)
        best_ceiling = min(best_ceiling, time.perf_counter() - t)
        sync(dev)
        t = time.perf_counter()
        copy_to_device("bench", sources, dev, out=dests)
        sync(dev)
        best_ours = min(best_ours, time.perf_counter() - t)
    del flat_dst
    ceiling_gbps = flat_src.numel() / best_ceiling / 1e9
    ours_gbps = total / best_ours / 1e9

    # ---- load-then-run vs execute-while-load -------------------------------------------------
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, arch.vocab_size, (args.prompt_len,), generator=g).to(dev)
    # warm up kernels once on already-loaded weights so neither timed run pays first-call costs
    loaded = [tensors_from_block_bytes(dests[b]) for b in range(args.blocks)]
    greedy(arch, loaded, ranges, prompt, 1)
    sync(dev)

    def load_then_run() -> tuple[float, list[int]]:
        for d in dests.values():
            d.zero_()
        sync(dev)
        t = time.perf_counter()
        copy_to_device("bench", sources, dev, out=dests)  # waits for every block
        ws = [tensors_from_block_bytes(dests[b]) for b in range(args.blocks)]
        x: torch.Tensor = prompt
        for b, w in enumerate(ws):
            x = run_block(arch, b, args.blocks, ranges[b], w, x)
        first = int(x[-1].argmax())
        ttft = time.perf_counter() - t
        rest = greedy(arch, ws, ranges, torch.cat([prompt, torch.tensor([first], device=dev)]), args.tokens - 1)
        return ttft, [first] + rest

    def execute_while_load() -> tuple[float, list[int]]:
        for d in dests.values():
            d.zero_()
        sync(dev)
        t = time.perf_counter()
        copy_stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        pending = enqueue_copies(sources, dev, out=dests, stream=copy_stream)
        x: torch.Tensor = prompt
        ws = []
        for p in pending:
            if p.event is not None:
                torch.cuda.current_stream(dev).wait_event(p.event)  # block b computes once it landed
            w = tensors_from_block_bytes(p.buffer)
            ws.append(w)
            x = run_block(arch, p.block, args.blocks, ranges[p.block], w, x)
        first = int(x[-1].argmax())
        ttft = time.perf_counter() - t
        rest = greedy(arch, ws, ranges, torch.cat([prompt, torch.tensor([first], device=dev)]), args.tokens - 1)
        return ttft, [first] + rest

    ltr = [load_then_run() for _ in range(args.repeat)]
    ewl = [execute_while_load() for _ in range(args.repeat)]
    ltr_t, ltr_tokens = min(r[0] for r in ltr), ltr[-1][1]
    ewl_t, ewl_tokens = min(r[0] for r in ewl), ewl[-1][1]
    same = all(r[1] == ltr_tokens for r in ltr + ewl)
    # compute alone (weights resident), for reference
    sync(dev)
    t = time.perf_counter()
    x = prompt
    for b in range(args.blocks):
        x = run_block(arch, b, args.blocks, ranges[b], loaded[b], x)
    int(x[-1].argmax())
    compute_t = time.perf_counter() - t

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"\ndevice: {name}; best of {args.repeat}")
    print(f"{'measure':<44} {'seconds':>9} {'GB/s':>8}")
    print(f"{'pinned copy ceiling (one copy_)':<44} {best_ceiling:9.4f} {ceiling_gbps:8.2f}")
    print(f"{'ours: copy_to_device (chunked, per-block)':<44} {best_ours:9.4f} {ours_gbps:8.2f}")
    print(f"{'  ours / ceiling':<44} {ours_gbps / ceiling_gbps * 100:8.1f}%  (goal >= 90%)")
    print(f"{'prefill alone, weights resident':<44} {compute_t:9.4f}")
    print(f"{'load-then-run: time to first token':<44} {ltr_t:9.4f}")
    print(f"{'execute-while-load: time to first token':<44} {ewl_t:9.4f}")
    print(f"{'  speedup':<44} {ltr_t / ewl_t:8.2f}x")
    print(f"tokens load-then-run {ltr_tokens} execute-while-load {ewl_tokens}: {'tokens match' if same else 'TOKENS DIFFER'}")
    print("date:", subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "shape": args.shape, "layers": arch.num_hidden_layers, "blocks": args.blocks,
                       "bytes": total, "ceiling_s": best_ceiling, "ceiling_gbps": ceiling_gbps, "ours_s": best_ours,
                       "ours_gbps": ours_gbps, "compute_s": compute_t, "ltr_ttft_s": ltr_t, "ewl_ttft_s": ewl_t,
                       "tokens_match": same, "tokens": ltr_tokens}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
