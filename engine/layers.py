"""Stateless building blocks of the GLM-4-MoE forward pass (pure PyTorch, any device/dtype).

Each function mirrors the op order of ``transformers``' ``modeling_glm4_moe`` so that float32
results agree with the HF reference to rounding: RMSNorm normalises in float32 and multiplies the
weight in the model dtype; RoPE tables are computed in float32 from the positions and cast to the
model dtype; only the first ``rotary_dim`` dims of each head rotate (NeoX-style halves).
:class:`RopeTable` caches those tables per position (computed exactly as HF computes them per
step) so a step does one row gather instead of recomputing ``cos``/``sin``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Glm4MoeRMSNorm``: float32 statistics, weight applied in the input dtype.

    In float32 ``F.rms_norm`` is the same arithmetic (``x * rsqrt(mean(x^2) + eps) * w``) in one
    call; other dtypes take HF's exact op sequence (normalise in float32, round, then weight)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return F.rms_norm(x, (x.shape[-1],), None, eps) * weight  # per-head weights (QK norm)
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


class RopeTable:
    """Per-position RoPE rows ``[cos | signed sin]`` (``[P, 2 * rotary_dim]``, model dtype), grown
    on demand to the next power of two (at most ``max_positions``). The sin half is stored with
    its first ``rotary_dim / 2`` entries negated, so rotation needs no ``cat`` (see
    :func:`apply_rope_`). Values are bit-identical to :func:`rope_cos_sin` of the same positions."""

    def __init__(
        self, rotary_dim: int, theta: float, max_positions: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self._inv_freq = rope_inv_freq(rotary_dim, theta, device)
        self._dtype = dtype
        self._table = torch.empty(0, 2 * rotary_dim, dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, signed_sin`` ``[T, 1, rotary_dim]`` for ``positions [T]``, all ``< max_position``."""
        if max_position > self._table.shape[0]:
            self._grow(max_position)
        rows = self._table.index_select(0, positions)[:, None, :]
        return rows[..., : self.rotary_dim], rows[..., self.rotary_dim :]

    def _grow(self, need: int) -> None:
        size = min(max(1024, 1 << (need - 1).bit_length()), max(need, self.max_positions))
        positions = torch.arange(size, device=self._inv_freq.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq, self._dtype)
        half = self.rotary_dim // 2
        sin[..., :half].neg_()
        self._table = torch.cat((cos[:, 0], sin[:, 0]), dim=-1)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate, in place, the leading ``cos.shape[-1]`` dims of ``x [tokens, heads, head_dim]``.

    Same arithmetic as HF's ``x_rot * cos + rotate_half(x_rot) * sin`` (NeoX halves):
    ``rotate_half(x) * sin == roll(x, half) * signed_sin`` exactly (only signs move). The pass-
    through dims are simply left untouched instead of being re-concatenated."""
    rotary_dim = cos.shape[-1]
    x_rot = x.narrow(-1, 0, rotary_dim)
    out = x_rot * cos
    out += torch.roll(x_rot, rotary_dim // 2, dims=-1) * signed_sin
    x_rot.copy_(out)


def swiglu_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with the gate and up projections fused as ``[2I, H]``."""
    gu = F.linear(x, gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)
