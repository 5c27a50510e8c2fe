"""Reference models from transformers for the engine's correctness tests (tiny random weights)."""

from __future__ import annotations

import functools
import warnings

import torch

from lambdascale.model.families import hf_config
from lambdascale.model.arch import SHAPES, ModelArch

FAMILIES = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral"]


@functools.lru_cache(maxsize=None)
def hf_model(shape: str, seed: int = 0):
    """(arch, transformers model, canonical state dict) for a registered tiny shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch: ModelArch = SHAPES[shape]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(**hf_config(arch))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # random init gives std-0.02 weights whose logits are nearly flat; widen them so greedy
    # decisions are well separated and an implementation error shows as a different token
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15 if "embed" not in name else 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return arch, model, sd


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' ``generate`` greedy continuation of ``prompt`` (exactly ``n`` new tokens)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )
    return out[0, len(prompt):].tolist()
