"""The GLM-4-MoE decoder (``Glm4MoeForCausalLM``) over a paged KV cache, in pure PyTorch.

Weights are plain tensors held in dataclasses (no ``nn.Module`` call overhead), built by
``engine.weights``. One forward step:

1. embed the flat token batch ``[T]`` -> ``[T, H]``; compute the RoPE tables once from positions;
2. per layer: RMSNorm -> fused QKV projection (+bias) -> optional per-head QK RMSNorm -> partial
   RoPE -> write K/V into the layer's pages -> ``on_layer_done(i)`` -> paged attention -> o_proj
   -> residual; RMSNorm -> dense SwiGLU (first ``first_k_dense_replace`` layers) or MoE -> residual;
3. in the last layer only the rows whose logits are wanted go through the MLP;
4. final RMSNorm and LM head on those rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata, paged_attention, write_kv
from pdserve.engine.layers import apply_rope_, rms_norm, rope_cos_sin, rope_inv_freq, swiglu_mlp
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.moe import MoEWeights, RouterParams, moe_forward


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H]: q rows, then k, then v
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [H, Hq * D]
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: q_norm's weight on every q head, then k_norm's


@dataclass
class DenseMLPWeights:
    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attn: AttentionWeights
    mlp: DenseMLPWeights | MoEWeights


@dataclass
class MtpLayerWeights:
    """One multi-token-prediction (NextN) layer as stored after the last decoder layer. Loaded for
    speculative decoding; never used by the main forward pass."""

    layer_idx: int
    eh_proj: torch.Tensor  # [H, 2H]
    enorm: torch.Tensor
    hnorm: torch.Tensor
    head_norm: torch.Tensor  # shared_head.norm
    head: torch.Tensor | None  # shared_head.head [V, H]; None = share the main lm_head
    embed: torch.Tensor | None  # embed_tokens [V, H]; None = share the main embedding
    decoder: DecoderLayerWeights


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[DecoderLayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    mtp: list[MtpLayerWeights]


class Glm4MoeModel:
    """Forward pass of the main model. Holds no KV state: the caller passes the KV pool."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.inv_freq = rope_inv_freq(config.rotary_dim, config.rope_theta, device)
        self.scale = config.head_dim**-0.5
        self.router_params = RouterParams(
            top_k=config.num_experts_per_tok,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_storage: torch.Tensor,
        logit_rows: torch.Tensor,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[len(logit_rows), H]`` of the flat batch ``input_ids [T]``."""
        cfg = self.config
        w = self.weights
        hidden = F.embedding(input_ids, w.embed)
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, self.dtype)
        last = len(w.layers) - 1
        for idx, layer in enumerate(w.layers):
            residual = hidden
            x = rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            x = self._attention(x, layer.attn, cos, sin, kv_storage[idx], meta, idx, on_layer_done)
            hidden = residual + x
            if idx == last:
                hidden = hidden.index_select(0, logit_rows)
                if hidden.shape[0] == 0:  # no logits wanted: every layer's K/V is written
                    break
            residual = hidden
            x = rms_norm(hidden, layer.post_attention_norm, cfg.rms_norm_eps)
            x = self._mlp(x, layer.mlp)
            hidden = residual + x
        return rms_norm(hidden, w.norm, cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: ``[N, H]`` -> ``[N, V]`` in the model dtype."""
        return F.linear(hidden, self.weights.lm_head)

    def _attention(
        self,
        x: torch.Tensor,
        w: AttentionWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        layer_idx: int,
        on_layer_done: Callable[[int], None] | None,
    ) -> torch.Tensor:
        cfg = self.config
        num_tokens = x.shape[0]
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = F.linear(x, w.qkv, w.qkv_bias).view(num_tokens, heads + 2 * kv_heads, cfg.head_dim)
        # q and k heads are adjacent: one QK-norm and one RoPE call cover both
        qk = qkv[:, : heads + kv_heads]
        if w.qk_norm is not None:
            qk = rms_norm(qk, w.qk_norm, cfg.rms_norm_eps)
        apply_rope_(qk, cos, sin)
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        write_kv(kv_layer, k, v, meta.slots)
        if on_layer_done is not None:
            if kv_layer.is_cuda:
                torch.cuda.current_stream(kv_layer.device).synchronize()
            on_layer_done(layer_idx)
        out = paged_attention(q, k, v, kv_layer, meta, self.scale)
        return F.linear(out, w.o_proj)

    def _mlp(self, x: torch.Tensor, w: DenseMLPWeights | MoEWeights) -> torch.Tensor:
        if isinstance(w, MoEWeights):
            return moe_forward(x, w, self.router_params)
        return swiglu_mlp(x, w.gate_up, w.down)
