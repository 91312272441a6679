"""The GLM-4-MoE decoder (``Glm4MoeForCausalLM``) over a paged KV cache, in pure PyTorch.

Weights are plain tensors held in dataclasses (no ``nn.Module`` call overhead), built by
``engine.weights``. One forward step:

1. embed the flat token batch ``[T]`` -> ``[T, H]``; gather the step's RoPE rows from the cached
   per-position table (:class:`RopeTable`);
2. per layer: RMSNorm -> fused QKV projection (+bias) -> optional per-head QK RMSNorm -> partial
   RoPE (in place, on q and k together) -> write K/V into the layer's pages (one ``index_copy_``)
   -> ``on_layer_done(i)`` -> paged attention -> o_proj -> residual; RMSNorm -> dense SwiGLU (first
   ``first_k_dense_replace`` layers) or MoE (dense expert GEMMs for few tokens, grouped per expert
   otherwise, see ``engine.moe``) -> residual;
3. in the last layer only the rows whose logits are wanted go through the MLP;
4. final RMSNorm and LM head on those rows (:class:`LMHead`: on CPU in float32 a oneDNN GEMM on a
   weight reordered once, 1.5-2x faster than ``F.linear`` for 8-64 rows on an AVX2 CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata, LayerKV, paged_attention, write_kv
from pdserve.engine.layers import RopeTable, apply_rope_, rms_norm, swiglu_mlp
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.moe import DenseExperts, MoEWeights, RouterParams, moe_forward

logger = logging.getLogger(__name__)

# The LM head's weight is reordered for oneDNN only up to this size (the reordered copy is extra
# memory next to the original, which the MTP layers and tied embeddings share).
LM_HEAD_PREPACK_MAX_BYTES = 512 * 2**20


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


class LMHead:
    """``F.linear(hidden, weight)``; on CPU in float32 through oneDNN on a weight reordered once
    (``torch.ops.mkldnn._linear_pointwise``, what inductor uses for frozen CPU linears). The
    reordered path is checked against ``F.linear`` on a probe at construction and skipped when the
    op is unavailable, disagrees, or the weight exceeds ``LM_HEAD_PREPACK_MAX_BYTES``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._packed: torch.Tensor | None = None
        nbytes = weight.numel() * weight.element_size()
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or nbytes > LM_HEAD_PREPACK_MAX_BYTES:
            return
        if not torch.backends.mkldnn.is_available():
            return
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
            ok = torch.allclose(got, F.linear(probe, weight), rtol=1e-4, atol=1e-4)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            logger.info("oneDNN LM head unavailable (%s): using F.linear", exc)
            return
        if ok:
            self._packed = packed
        else:
            logger.warning("oneDNN LM head disagrees with F.linear on a probe: using F.linear")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and hidden.dtype == torch.float32 and hidden.dim() == 2:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(hidden, self._packed, None, "none", [], "")
            return out
        return F.linear(hidden, self.weight)


class Glm4MoeModel:
    """Forward pass of the main model. Holds no KV state: the caller passes the KV pool."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype
        self.rope = RopeTable(
            config.rotary_dim, config.rope_theta, config.max_position_embeddings, device, dtype
        )
        self.scale = config.head_dim**-0.5
        self.router_params = RouterParams(
            top_k=config.num_experts_per_tok,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
        )
        self.dense_experts = [
            DenseExperts.build(layer.mlp) if isinstance(layer.mlp, MoEWeights) else None
            for layer in weights.layers
        ]
        self.lm_head = LMHead(weights.lm_head)
        self._kv_views: tuple[torch.Tensor, list[LayerKV]] | None = None

    def layer_kv(self, kv_storage: torch.Tensor) -> list[LayerKV]:
        """Per-layer page views of ``kv_storage`` (built once per pool, reused every step)."""
        cached = self._kv_views
        if cached is None or cached[0] is not kv_storage:
            cached = (kv_storage, [LayerKV(kv_storage[i]) for i in range(len(self.weights.layers))])
            self._kv_views = cached
        return cached[1]

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_storage: torch.Tensor,
        logit_rows: torch.Tensor | None,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[len(logit_rows), H]`` of the flat batch ``input_ids [T]``
        (``logit_rows`` None: every row)."""
        cfg = self.config
        w = self.weights
        eps = cfg.rms_norm_eps
        hidden = F.embedding(input_ids, w.embed)
        cos, sin = self.rope.lookup(meta.positions, meta.max_position)
        layer_kv = self.layer_kv(kv_storage)
        last = len(w.layers) - 1
        for idx, layer in enumerate(w.layers):
            x = rms_norm(hidden, layer.input_norm, eps)
            x = self._attention(x, layer.attn, cos, sin, layer_kv[idx], meta, idx, on_layer_done)
            hidden = hidden + x  # HF: residual + attention output
            if idx == last and logit_rows is not None:
                hidden = hidden.index_select(0, logit_rows)
                if hidden.shape[0] == 0:  # no logits wanted: every layer's K/V is written
                    break
            x = rms_norm(hidden, layer.post_attention_norm, eps)
            if isinstance(layer.mlp, MoEWeights):
                x = moe_forward(x, layer.mlp, self.router_params, self.dense_experts[idx])
            else:
                x = swiglu_mlp(x, layer.mlp.gate_up, layer.mlp.down)
            hidden = hidden + x
        return rms_norm(hidden, w.norm, eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: ``[N, H]`` -> ``[N, V]`` in the model dtype."""
        return self.lm_head(hidden)

    def _attention(
        self,
        x: torch.Tensor,
        w: AttentionWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
        layer_idx: int,
        on_layer_done: Callable[[int], None] | None,
    ) -> torch.Tensor:
        cfg = self.config
        num_tokens = x.shape[0]
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = F.linear(x, w.qkv, w.qkv_bias).view(num_tokens, heads + 2 * kv_heads, head_dim)
        # q and k heads are adjacent: one QK-norm and one RoPE call cover both, in place in qkv,
        # so the new K and V stay adjacent for a single KV write
        qk = qkv.narrow(1, 0, heads + kv_heads)
        if w.qk_norm is not None:
            qk.copy_(rms_norm(qk, w.qk_norm, cfg.rms_norm_eps))
        apply_rope_(qk, cos, sin)
        new_kv = qkv.narrow(1, heads, 2 * kv_heads)
        write_kv(kv, new_kv.view(num_tokens, 2, kv_heads, head_dim), meta.slots)
        if on_layer_done is not None:
            if kv.pages.is_cuda:
                torch.cuda.current_stream(kv.pages.device).synchronize()
            on_layer_done(layer_idx)
        q = qkv.narrow(1, 0, heads)
        k, v = new_kv.narrow(1, 0, kv_heads), new_kv.narrow(1, kv_heads, kv_heads)
        return F.linear(paged_attention(q, k, v, kv, meta, self.scale), w.o_proj)
