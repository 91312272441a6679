"""GLM-4-MoE routed experts: sigmoid router with group-limited top-k, grouped expert compute.

Routing (HF ``Glm4MoeTopkRouter``, always in float32):

1. ``scores = sigmoid(x @ W_router^T)``;
2. ``e_score_correction_bias`` is added for *selection only*;
3. experts are split into ``n_group`` groups, each group scored by the sum of its top-2 biased
   scores; only the best ``topk_group`` groups stay eligible;
4. the top ``num_experts_per_tok`` eligible experts are chosen; their weights are the *raw*
   sigmoid scores, renormalised when ``norm_topk_prob`` and scaled by ``routed_scaling_factor``.

Expert compute groups the (token, slot) pairs by expert with one stable argsort, runs one
SwiGLU per *active* expert on its contiguous slice, and accumulates the weighted outputs with a
single ``index_add_`` (per token, in ascending expert order — the order HF sums them in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.layers import swiglu_mlp


@dataclass
class MoEWeights:
    """One MoE layer. Expert weights are stacked: ``gate_up[E, 2I, H]`` (gate rows first),
    ``down[E, H, I]``. Router weight and correction bias are float32 (as HF keeps them)."""

    router: torch.Tensor
    correction_bias: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    shared_gate_up: torch.Tensor | None
    shared_down: torch.Tensor | None


@dataclass(frozen=True)
class RouterParams:
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def route(
    x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, p: RouterParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights float32 [T, k], topk_ids int64 [T, k])`` for hidden states ``x [T, H]``."""
    logits = F.linear(x.to(torch.float32), router.to(torch.float32))
    scores = logits.sigmoid()
    choice = scores + bias
    num_tokens, num_experts = choice.shape
    if p.n_group > 1 and p.topk_group < p.n_group:
        grouped = choice.view(num_tokens, p.n_group, num_experts // p.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, group_idx, True)
        keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    topk_ids = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if p.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * p.routed_scaling_factor
    return weights, topk_ids


def experts_forward(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w: MoEWeights
) -> torch.Tensor:
    """Weighted sum over each token's chosen experts, ``[T, H]`` in ``x.dtype``."""
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] == 0:
        return torch.zeros_like(x)
    num_experts = w.gate_up.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // top_k
    x_sorted = x.index_select(0, token_of)
    outs: list[torch.Tensor] = []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        seg = x_sorted[start : start + count]
        outs.append(swiglu_mlp(seg, w.gate_up[expert], w.down[expert]))
        start += count
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    y = (y * topk_weights.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, y)
    return out


def moe_forward(x: torch.Tensor, w: MoEWeights, p: RouterParams) -> torch.Tensor:
    """HF ``Glm4MoeMoE.forward``: routed experts plus the shared expert(s)."""
    topk_weights, topk_ids = route(x, w.router, w.correction_bias, p)
    out = experts_forward(x, topk_weights, topk_ids, w)
    if w.shared_gate_up is not None and w.shared_down is not None:
        out = out + swiglu_mlp(x, w.shared_gate_up, w.shared_down)
    return out
