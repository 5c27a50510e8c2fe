"""Random-weight models of a registered shape (benchmarks, tests, the emulated cluster).

Weights are generated block by block from a seeded generator, so only one block is ever in
memory and the same (shape, layers, seed) always gives the same bytes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from lambdascale.model.arch import ModelArch
from lambdascale.model.blockfile import block_tensor_shapes
from lambdascale.model.checkpoint import BlockSource


def synthetic_block_source(arch: ModelArch, n_blocks: int, seed: int = 0, std: float = 0.02) -> BlockSource:
    """A :data:`BlockSource` producing N(0, std) matrices, unit norms and zero biases.

    The last block's ``lm_head.weight`` is a copy of the embedding when the arch ties them,
    regenerated with block 0's generator so it equals block 0's embedding exactly.
    """

    def embedding() -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003)
        return torch.randn(arch.vocab_size, arch.hidden_size, generator=g) * std

    def source(b: int, layers: tuple[int, int]) -> Mapping[str, torch.Tensor]:
        shapes = block_tensor_shapes(arch, layers, b == 0, b == n_blocks - 1)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 1 + b)
        out: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            if name == "model.embed_tokens.weight" or (name == "lm_head.weight" and arch.tie_word_embeddings):
                out[name] = embedding()
            elif name.endswith("norm.weight"):
                out[name] = torch.ones(shape)
            elif name.endswith(".bias"):
                out[name] = torch.randn(shape, generator=g) * std
            else:
                out[name] = torch.randn(shape, generator=g) * std
        return out

    return source
