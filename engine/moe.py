"""GLM-4-MoE routed experts: sigmoid router with group-limited top-k, expert compute in two modes.

Routing (HF ``Glm4MoeTopkRouter``, always in float32):

1. ``scores = sigmoid(x @ W_router^T)``;
2. ``e_score_correction_bias`` is added for *selection only*;
3. experts are split into ``n_group`` groups, each group scored by the sum of its top-2 biased
   scores; only the best ``topk_group`` groups stay eligible;
4. the top ``num_experts_per_tok`` eligible experts are chosen; their weights are the *raw*
   sigmoid scores, renormalised when ``norm_topk_prob`` and scaled by ``routed_scaling_factor``.

Expert compute (both give the HF result up to float rounding):

* **grouped** (:func:`experts_forward`, many tokens): the (token, slot) pairs are grouped by expert
  with one stable argsort, the experts run on their contiguous slices (two grouped GEMMs on CPU,
  else one SwiGLU per *active* expert), and the weighted outputs are accumulated with a single
  ``index_add_`` (per token, in ascending expert order — the order HF sums them in); the shared
  expert(s) are added after, as HF does;
* **dense** (:func:`dense_experts_forward`, few tokens, small experts — decode): every expert and
  the shared expert(s) run on every token as two GEMMs over concatenated weights
  (:class:`DenseExperts`), the routing weights (0 for unchosen experts, 1 for shared ones) scale
  the intermediate activations, and the down GEMM sums over experts. A decode step then costs ~15
  small ops instead of ~6 per active expert; the extra FLOPs are cheap while ``T * E`` is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.layers import swiglu_mlp

# Dense expert compute while tokens * routed experts <= this and the layer's concatenated expert
# weights stay small (they are copied once): measured on CPU with 8 experts of 64 x 128, the dense
# path wins up to ~64 tokens (see docs/benchmarks.md).
DENSE_MAX_TOKEN_EXPERTS = 512
DENSE_MAX_WEIGHT_BYTES = 32 * 2**20


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


@dataclass
class DenseExperts:
    """Routed experts then shared expert units as ``P = E + S`` uniform "pseudo-experts" of
    intermediate size ``I`` (a shared expert of ``n * I`` units is ``n`` of them: SwiGLU is
    per-unit, so splitting its units is exact). ``gate_up [2 * P * I, H]``: the gate rows of every
    pseudo-expert, then their up rows; ``down [H, P * I]``; ``coef_row [1, P]``: 0 for routed
    experts, 1 for shared ones (each step's routing weights are scattered into a ``[T, P]`` copy)."""

    num_routed: int
    num_shared: int
    intermediate: int
    gate_up: torch.Tensor
    down: torch.Tensor
    coef_row: torch.Tensor
    max_tokens: int  # use the dense path for at most this many tokens

    @classmethod
    def build(cls, w: MoEWeights) -> DenseExperts | None:
        """Concatenated weights of ``w``, or None when they would be too large to be worth it."""
        num_experts, two_i, hidden = w.gate_up.shape
        inter = two_i // 2
        max_tokens = DENSE_MAX_TOKEN_EXPERTS // num_experts
        nbytes = (w.gate_up.numel() + w.down.numel()) * w.gate_up.element_size()
        if max_tokens < 1 or nbytes > DENSE_MAX_WEIGHT_BYTES:
            return None
        gates = [w.gate_up[:, :inter].reshape(num_experts * inter, hidden)]
        ups = [w.gate_up[:, inter:].reshape(num_experts * inter, hidden)]
        down = [w.down.permute(1, 0, 2).reshape(hidden, num_experts * inter)]
        num_shared = 0
        if w.shared_gate_up is not None and w.shared_down is not None:
            shared_inter = w.shared_gate_up.shape[0] // 2
            if shared_inter % inter:
                return None
            num_shared = shared_inter // inter
            gates.append(w.shared_gate_up[:shared_inter])
            ups.append(w.shared_gate_up[shared_inter:])
            down.append(w.shared_down)
        coef = torch.zeros(1, num_experts + num_shared, dtype=torch.float32, device=w.gate_up.device)
        coef[:, num_experts:] = 1.0
        return cls(
            num_routed=num_experts,
            num_shared=num_shared,
            intermediate=inter,
            gate_up=torch.cat(gates + ups, dim=0).contiguous(),
            down=torch.cat(down, dim=1).contiguous(),
            coef_row=coef,
            max_tokens=max_tokens,
        )


def route(
    x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, p: RouterParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights float32 [T, k], topk_ids int64 [T, k])`` for hidden states ``x [T, H]``."""
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    logits = F.linear(xf, router if router.dtype == torch.float32 else router.to(torch.float32))
    return select_experts(logits, bias, p)


def select_experts(
    logits: torch.Tensor, bias: torch.Tensor, p: RouterParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing from float32 router logits ``[T, E]`` (steps 1-4 of the module doc)."""
    scores = logits.sigmoid()
    choice = scores + bias
    num_tokens, num_experts = choice.shape
    if p.n_group > 1 and p.topk_group < p.n_group:
        grouped = choice.view(num_tokens, p.n_group, num_experts // p.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
        drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, False)
        grouped.masked_fill_(drop.unsqueeze(-1), float("-inf"))
    topk_ids = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if p.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    if p.routed_scaling_factor != 1.0:  # HF multiplies by it unconditionally; * 1.0 is exact
        weights *= p.routed_scaling_factor
    return weights, topk_ids


def experts_forward(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w: MoEWeights
) -> torch.Tensor:
    """Weighted sum over each token's chosen experts, ``[T, H]`` in ``x.dtype`` (grouped mode).

    The (token, slot) rows sorted by expert go through two grouped GEMMs (``torch._grouped_mm``,
    one call for all experts, what HF's ``grouped_mm`` experts use) on CPU, else through one
    SwiGLU per active expert writing into its rows of one preallocated buffer."""
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] == 0:
        return torch.zeros_like(x)
    num_experts, _, inter = w.down.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts)
    token_of = order // top_k
    x_sorted = x.index_select(0, token_of)
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is not None and x.device.type == "cpu":
        offsets = counts.cumsum(0).to(torch.int32)
        gu = grouped_mm(x_sorted, w.gate_up.transpose(1, 2), offs=offsets)
        y = grouped_mm(F.silu(gu[:, :inter]).mul_(gu[:, inter:]), w.down.transpose(1, 2), offs=offsets)
    else:
        y = torch.empty_like(x_sorted)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end = start + count
            gu = F.linear(x_sorted[start:end], w.gate_up[expert])
            act = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
            torch.matmul(act, w.down[expert].t(), out=y[start:end])
            start = end
    weights = topk_weights.reshape(-1)[order].unsqueeze(-1)
    if y.dtype == weights.dtype:
        y.mul_(weights)
    else:  # as HF: the product in float32, rounded once to the model dtype
        y = (y * weights).to(x.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, y)
    return out


def dense_experts_forward(x: torch.Tensor, w: MoEWeights, p: RouterParams, d: DenseExperts) -> torch.Tensor:
    """Router, routed experts and shared expert(s) for every token of ``x [T, H]`` (dense mode)."""
    num_tokens = x.shape[0]
    width = (d.num_routed + d.num_shared) * d.intermediate
    topk_weights, topk_ids = route(x, w.router, w.correction_bias, p)
    gu = F.linear(x, d.gate_up)
    act = F.silu(gu.narrow(1, 0, width)) * gu.narrow(1, width, width)  # [T, P * I]
    coef = d.coef_row.expand(num_tokens, -1).clone().scatter_(1, topk_ids, topk_weights)
    if coef.dtype != x.dtype:
        coef = coef.to(x.dtype)
    act.view(num_tokens, -1, d.intermediate).mul_(coef.unsqueeze(-1))
    return F.linear(act, d.down)


def moe_forward(
    x: torch.Tensor, w: MoEWeights, p: RouterParams, dense: DenseExperts | None = None
) -> torch.Tensor:
    """HF ``Glm4MoeMoE.forward``: routed experts plus the shared expert(s). ``dense``: the layer's
    concatenated weights, used when ``x`` has at most ``dense.max_tokens`` rows."""
    if dense is not None and x.shape[0] <= dense.max_tokens:
        return dense_experts_forward(x, w, p, dense)
    topk_weights, topk_ids = route(x, w.router, w.correction_bias, p)
    out = experts_forward(x, topk_weights, topk_ids, w)
    if w.shared_gate_up is not None and w.shared_down is not None:
        out = out + swiglu_mlp(x, w.shared_gate_up, w.shared_down)
    return out
