"""Rotary position embeddings (RoPE) with the scaling variants the Llama family uses.

Why a module of its own: every execution block needs the same cos/sin tables for the positions
of the tokens it processes, and a stage in a pipeline must compute them without the rest of the
model. ``RotaryEmbedding`` is therefore a small, weight-free object built from ``ModelArch``.

Convention: "rotate half" (the one Hugging Face's Llama uses): a head vector ``x`` of size ``d`` is
split into halves ``x1 = x[:d/2]``, ``x2 = x[d/2:]`` and rotated as
``x * cos + cat(-x2, x1) * sin`` with ``cos``/``sin`` of size ``d`` (each frequency twice).

Scaling variants (``arch.rope_scaling["rope_type"]``, or legacy ``"type"``):

- ``default`` / None: ``inv_freq[i] = theta ** (-2i/d)``.
- ``linear``: positions divided by ``factor`` (equivalently ``inv_freq / factor``).
- ``dynamic`` (NTK): the base grows with the sequence length once it exceeds
  ``max_position_embeddings``; within that length it equals ``default``.
- ``llama3``: low frequencies divided by ``factor``, high ones kept, smooth ramp between.
- ``yarn``: ramp between interpolated and extrapolated frequencies, plus an attention factor that
  scales cos/sin.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lambdascale.errors import InvalidRequestError
from lambdascale.model.arch import ModelArch

#: RoPE scaling types we compute (``rope_scaling["rope_type"]``).
SUPPORTED_SCALING = ("default", "linear", "dynamic", "llama3", "yarn")


def _rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``theta ** (-2i/dim)`` for i in [0, dim/2), float32, shape [dim/2]."""
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta ** exps)


def _scaling_param(scaling: dict[str, Any], key: str, rope_type: str) -> Any:
    if key not in scaling or scaling[key] is None:
        raise InvalidRequestError(f"rope_scaling of type {rope_type!r} needs field {key!r}; got {scaling!r}")
    return scaling[key]


def compute_inv_freq(arch: ModelArch, seq_len: int | None = None, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, shape [rotary_dim/2]) and the cos/sin scale for ``arch``.

    ``seq_len`` matters only for ``dynamic`` scaling (the longest sequence in the batch).
    ``local``: the table of sliding-window layers where the arch gives them a base of their own
    (Gemma 3: ``rope_local_theta``, unscaled). Raises ``InvalidRequestError`` for an unknown
    scaling type, naming the supported ones.
    """
    dim = arch.rotary_dim
    if local and arch.rope_local_theta is not None:
        return _base_inv_freq(arch.rope_local_theta, dim), 1.0
    theta = arch.rope_theta
    scaling = arch.rope_scaling or {}
    rope_type = _rope_type(arch.rope_scaling)
    if rope_type not in SUPPORTED_SCALING:
        raise InvalidRequestError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_SCALING)}")
    if rope_type == "default":
        return _base_inv_freq(theta, dim), 1.0
    if rope_type == "linear":
        factor = float(_scaling_param(scaling, "factor", rope_type))
        return _base_inv_freq(theta, dim) / factor, 1.0
    if rope_type == "dynamic":
        factor = float(_scaling_param(scaling, "factor", rope_type))
        max_pos = arch.max_position_embeddings
        n = max(seq_len or max_pos, max_pos)
        base = theta * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        factor = float(_scaling_param(scaling, "factor", rope_type))
        low = float(_scaling_param(scaling, "low_freq_factor", rope_type))
        high = float(_scaling_param(scaling, "high_freq_factor", rope_type))
        old_ctx = float(scaling.get("original_max_position_embeddings") or arch.max_position_embeddings)
        inv = _base_inv_freq(theta, dim)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    orig = scaling.get("original_max_position_embeddings") or arch.max_position_embeddings
    raw_factor = scaling.get("factor")
    factor = float(raw_factor) if raw_factor is not None else arch.max_position_embeddings / orig
    attn_factor = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def _mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if attn_factor is None:
        attn_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def _corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = _corr_dim(beta_fast), _corr_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = extrapolate (high frequency), 0 = interpolate
    return inter * (1 - keep) + extra * keep, float(attn_factor)


class RotaryEmbedding:
    """cos/sin for arbitrary position ids; weight-free, one per stage.

    ``cos_sin(positions)`` takes int64 positions of shape [N] and returns two tensors of shape
    [N, rotary_dim] in ``dtype`` (computed in float32 first, as the reference does).
    """

    def __init__(self, arch: ModelArch, device: torch.device | str = "cpu", local: bool = False) -> None:
        self.arch = arch
        self.device = torch.device(device)
        self.dynamic = _rope_type(arch.rope_scaling) == "dynamic" and not (local and arch.rope_local_theta is not None)
        inv, scale = compute_inv_freq(arch, local=local)
        self.inv_freq = inv.to(self.device)  # [d/2] float32
        self.scale = scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        if self.dynamic and seq_len is not None and seq_len > self.arch.max_position_embeddings:
            inv = compute_inv_freq(self.arch, seq_len)[0].to(self.device)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]  # [N, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, d]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [N, heads, d] by per-token ``cos``/``sin`` [N, r] (rotate-half convention).

    With partial rotary (r < d) only the first r dimensions of each head turn; the rest pass.
    """
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
