"""Seeded random weights for a GLM-4-MoE config, with HF checkpoint names (imports torch).

Every tensor comes from one ``torch.Generator`` in a fixed order (float64 draws cast to float32,
so results do not depend on the CPU's vector unit). Layout, as in GLM-4.5 checkpoints:

- ``model.embed_tokens``, ``model.norm``, ``lm_head``;
- per decoder layer ``model.layers.{i}``: attention ``q/k/v_proj`` (weight + bias when
  ``attention_bias``), ``o_proj``, optional ``q_norm``/``k_norm``; a dense SwiGLU ``mlp.*_proj``
  for ``i < first_k_dense_replace``, else ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``,
  per-expert ``mlp.experts.{e}.{gate,up,down}_proj`` and ``mlp.shared_experts.*``;
- MTP layers at ``num_hidden_layers + k``: a full decoder layer plus ``eh_proj``, ``enorm``,
  ``hnorm``, ``shared_head.norm``, ``shared_head.head`` and ``embed_tokens`` (the last two copies
  of ``lm_head`` and ``model.embed_tokens``: loaders that share them and loaders that read them
  agree).

Scales are chosen so a random model is usable for testing: logits spread widely enough that
greedy decoding picks varied tokens with clear margins, router scores decisive enough that top-k
selection is stable, and the residual stream depends on context (attention/MLP outputs comparable
to the embeddings), so KV-cache bugs change the output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

EMBED_STD = 0.3
LINEAR_STD = 0.08
ROUTER_STD = 0.1
LM_HEAD_STD = 0.3
BIAS_STD = 0.02
NORM_JITTER = 0.1


Spec = tuple[str, tuple[int, ...], str]


def _layer_specs(cfg: Mapping[str, Any], prefix: str, layer: int) -> Iterator[Spec]:
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    q_out = int(cfg["num_attention_heads"]) * head_dim
    kv_out = int(cfg["num_key_value_heads"]) * head_dim
    yield f"{prefix}.input_layernorm.weight", (hidden,), "norm"
    for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        yield f"{prefix}.self_attn.{proj}.weight", (out, hidden), "linear"
        if cfg.get("attention_bias"):
            yield f"{prefix}.self_attn.{proj}.bias", (out,), "bias"
    yield f"{prefix}.self_attn.o_proj.weight", (hidden, q_out), "linear"
    if cfg.get("use_qk_norm"):
        yield f"{prefix}.self_attn.q_norm.weight", (head_dim,), "norm"
        yield f"{prefix}.self_attn.k_norm.weight", (head_dim,), "norm"
    yield f"{prefix}.post_attention_layernorm.weight", (hidden,), "norm"
    if layer < int(cfg["first_k_dense_replace"]):
        inter = int(cfg["intermediate_size"])
        yield from _mlp_specs(f"{prefix}.mlp", hidden, inter)
        return
    experts = int(cfg["n_routed_experts"])
    moe_inter = int(cfg["moe_intermediate_size"])
    yield f"{prefix}.mlp.gate.weight", (experts, hidden), "router"
    yield f"{prefix}.mlp.gate.e_score_correction_bias", (experts,), "bias"
    for e in range(experts):
        yield from _mlp_specs(f"{prefix}.mlp.experts.{e}", hidden, moe_inter)
    shared = int(cfg.get("n_shared_experts") or 0)
    if shared:
        yield from _mlp_specs(f"{prefix}.mlp.shared_experts", hidden, moe_inter * shared)


def _mlp_specs(prefix: str, hidden: int, inter: int) -> Iterator[Spec]:
    yield f"{prefix}.gate_proj.weight", (inter, hidden), "linear"
    yield f"{prefix}.up_proj.weight", (inter, hidden), "linear"
    yield f"{prefix}.down_proj.weight", (hidden, inter), "linear"


def weight_specs(cfg: Mapping[str, Any]) -> Iterator[Spec]:
    """``(name, shape, kind)`` of every checkpoint tensor, in generation order. ``kind`` is one
    of embed, linear, bias, norm, router, lm_head, or ``copy:<name>`` (a copy of an earlier one)."""
    hidden = int(cfg["hidden_size"])
    vocab = int(cfg["vocab_size"])
    layers = int(cfg["num_hidden_layers"])
    yield "model.embed_tokens.weight", (vocab, hidden), "embed"
    for i in range(layers):
        yield from _layer_specs(cfg, f"model.layers.{i}", i)
    yield "model.norm.weight", (hidden,), "norm"
    yield "lm_head.weight", (vocab, hidden), "lm_head"
    for k in range(int(cfg.get("num_nextn_predict_layers") or 0)):
        i = layers + k
        prefix = f"model.layers.{i}"
        yield f"{prefix}.embed_tokens.weight", (vocab, hidden), "copy:model.embed_tokens.weight"
        yield f"{prefix}.enorm.weight", (hidden,), "norm"
        yield f"{prefix}.hnorm.weight", (hidden,), "norm"
        yield f"{prefix}.eh_proj.weight", (hidden, 2 * hidden), "linear"
        yield from _layer_specs(cfg, prefix, i)
        yield f"{prefix}.shared_head.norm.weight", (hidden,), "norm"
        yield f"{prefix}.shared_head.head.weight", (vocab, hidden), "copy:lm_head.weight"


def random_weights(cfg: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """All tensors (float32, contiguous, none sharing storage), deterministic for ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    std = {"embed": EMBED_STD, "linear": LINEAR_STD, "bias": BIAS_STD, "router": ROUTER_STD,
           "lm_head": LM_HEAD_STD, "norm": NORM_JITTER}
    for name, shape, kind in weight_specs(cfg):
        if kind.startswith("copy:"):
            out[name] = out[kind.removeprefix("copy:")].clone()
            continue
        draw = torch.randn(shape, generator=gen, dtype=torch.float64) * std[kind]
        if kind == "norm":
            draw += 1.0
        out[name] = draw.to(torch.float32).contiguous()
    return out
