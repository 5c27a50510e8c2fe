"""GGML block quantizations dequantized with torch: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K.

Why our own: the ``gguf`` package's numpy dequantizers run at 8-70 MB/s of source bytes on
this machine (bench/bench_import.py), far below a disk's read rate; these do the same float32
arithmetic in the same order as torch tensor ops, so results equal ``gguf.quants.dequantize``
bit for bit (tests/model/test_quantized.py) at a multiple of its speed.

Each function takes the raw blocks as a uint8 tensor [n_blocks, type_size] and returns float32
[n_blocks, block_size]. Layouts (llama.cpp's ``ggml-common.h``; QK_K = 256):

* Q4_0 (18 B / 32): f16 d, 16 B of nibbles (low nibbles = values 0..15, high = 16..31); x = d * (q - 8)
* Q4_1 (20 B / 32): f16 d, f16 m, nibbles as Q4_0; x = d * q + m
* Q8_0 (34 B / 32): f16 d, 32 int8; x = q * d
* Q4_K (144 B / 256): f16 d, f16 dmin, 12 B of eight 6-bit (scale, min) pairs, 128 B nibbles in
  four 64-value groups; x = (d * sc) * q - (dmin * m) per 32 values
* Q5_K (176 B / 256): as Q4_K plus 32 B of high bits (bit j of byte i: value 32 j + i)
* Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2-bits, 16 int8 scales, f16 d;
  x = (d * scale) * (q - 32) per 16 values
"""

from __future__ import annotations

from typing import Callable

import torch

QK_K = 256


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Two bytes per row as float16, widened to float32: [n, 2] uint8 -> [n, 1]."""
    return col.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[n, groups * width] bytes -> [n, groups * 2, width]: each group's low nibbles then its high."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, width)
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return ((q >> shifts) & 0x0F).reshape(n, groups * 2, width)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 1, 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 1, 16).reshape(b.shape[0], 32).to(torch.float32)
    return d * q + m


def q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, [n, 8] each."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.to(torch.float32)).reshape(n, 8, 1), (dmin * mn.to(torch.float32)).reshape(n, 8, 1)


def q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:144], 4, 32).to(torch.float32)  # [n, 8, 32]
    return (d * q - dm).reshape(b.shape[0], QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    ql = _nibbles(b[:, 48:176], 4, 32)  # [n, 8, 32]
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 0x01  # [n, 8, 32]
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # [n, 16]
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 2, 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, 16).to(torch.float32)
    return (d * q).reshape(n, QK_K)


#: quant type name -> (values per block, bytes per block, dequantizer).
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q4_0": (32, 18, q4_0),
    "Q4_1": (32, 20, q4_1),
    "Q8_0": (32, 34, q8_0),
    "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k),
    "Q6_K": (QK_K, 210, q6_k),
}

#: Blocks dequantized per call: bounds the float32 temporaries (about 64 MiB of output).
_BLOCKS_PER_CALL = 1 << 16


def dequantize(raw: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor's raw bytes (uint8, any shape) -> flat ``out_dtype`` values, in slices of blocks."""
    per, size, fn = DEQUANTIZERS[qtype]
    blocks = raw.reshape(-1, size)
    out = torch.empty(blocks.shape[0] * per, dtype=out_dtype)
    view = out.view(blocks.shape[0], per)
    for s in range(0, blocks.shape[0], _BLOCKS_PER_CALL):
        view[s:s + _BLOCKS_PER_CALL] = fn(blocks[s:s + _BLOCKS_PER_CALL])
    return out
