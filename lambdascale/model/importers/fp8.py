"""FP8 (e4m3) safetensors checkpoints: each FP8 weight comes with a float ``weight_scale``, one
per tensor (shape [] or [1]) or one per output channel ([out] or [out, 1]); the real weight is
``w.float() * scale``. We dequantize to bfloat16 on the CPU at import, so the block format keeps
one dtype the engine runs everywhere (an FP8 kernel path on GPUs that have one is not built yet).

The config must say how it was quantized (``quantization_config.quant_method``): ``fp8``
(transformers' own, without block-wise scales), ``fbgemm_fp8`` (per channel) and
``compressed-tensors`` (llm-compressor's FP8, per tensor or per channel) are read; block-wise
scales (``weight_block_size``, DeepSeek's ``weight_scale_inv``) and other methods are refused
naming the field.
"""

from __future__ import annotations

from typing import Any

import torch

from lambdascale.errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn,)
#: quant_method values whose FP8 weights carry per-tensor or per-channel ``weight_scale``.
FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")


def check_fp8_config(qc: Any) -> bool:
    """True when ``quantization_config`` describes FP8 weights we read; ValueError naming the
    field otherwise (None: not quantized)."""
    if qc is None:
        return False
    if not isinstance(qc, dict):
        raise ValueError(f"field quantization_config is not an object: {qc!r}")
    method = qc.get("quant_method")
    if method not in FP8_METHODS:
        raise ValueError(f"field quantization_config.quant_method={method!r} is not supported "
                         f"(supported: {', '.join(FP8_METHODS)}, FP8 e4m3 with per-tensor or per-channel scales)")
    if qc.get("weight_block_size"):
        raise ValueError(f"field quantization_config.weight_block_size={qc['weight_block_size']!r}: block-wise FP8 "
                         "scales are not supported (per-tensor or per-channel only)")
    if qc.get("fmt") not in (None, "e4m3"):
        raise ValueError(f"field quantization_config.fmt={qc['fmt']!r} is not supported (e4m3 only)")
    return True


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor | None, where: str) -> torch.Tensor:
    """An FP8 weight [out, ...] times its scale, as bfloat16 (the product is formed in float32)."""
    if w.dtype not in FP8_DTYPES:
        raise CheckpointError(f"{where}: dtype {w.dtype} is not FP8 e4m3")
    if scale is None:
        raise CheckpointError(f"{where}: an FP8 weight without its weight_scale tensor")
    s = scale.to(torch.float32)
    if s.numel() == 1:
        s = s.reshape(())
    elif s.numel() == w.shape[0] and (s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1)):
        s = s.reshape(w.shape[0], *([1] * (w.dim() - 1)))
    else:
        raise CheckpointError(f"{where}: weight_scale of shape {tuple(scale.shape)} is neither per-tensor nor "
                              f"per-channel for a weight of shape {tuple(w.shape)} (block-wise scales are not supported)")
    return (w.to(torch.float32) * s).to(torch.bfloat16)
