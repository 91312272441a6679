"""Stateless building blocks of the GLM-4-MoE forward pass (pure PyTorch, any device/dtype).

Each function mirrors the op order of ``transformers``' ``modeling_glm4_moe`` so that float32
results agree with the HF reference to rounding: RMSNorm normalises in float32 and multiplies the
weight in the model dtype; RoPE tables are computed in float32 from the positions and cast to the
model dtype; only the first ``rotary_dim`` dims of each head rotate (NeoX-style halves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Glm4MoeRMSNorm``: float32 statistics, weight applied in the input dtype."""
    input_dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(input_dtype)


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Inverse frequencies (float32) of the default RoPE over ``rotary_dim`` dims."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return (1.0 / (theta**exponent)).to(device)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[num_tokens, 1, rotary_dim]`` (broadcast over heads)."""
    freqs = positions[:, None].to(torch.float32) * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate, in place, the leading ``cos.shape[-1]`` dims of ``x [tokens, heads, head_dim]``.

    Same arithmetic as HF's ``x_rot * cos + rotate_half(x_rot) * sin`` (NeoX halves); the pass-
    through dims are simply left untouched instead of being re-concatenated."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    x_rot = x[..., :rotary_dim]
    rotated = torch.cat((-x[..., half:rotary_dim], x[..., :half]), dim=-1)
    x_rot.copy_(x_rot * cos + rotated * sin)


def swiglu_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with the gate and up projections fused as ``[2I, H]``."""
    gu = F.linear(x, gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)
