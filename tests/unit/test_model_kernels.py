"""The runner's fast paths against their reference formulations: step packing (decode fast path
and general path), dense vs grouped MoE vs HF's own ``Glm4MoeMoE``, flat-GEMM vs SDPA decode
attention, the cached RoPE table, the oneDNN LM head, and a wide decode batch end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_helpers import make_checkpoint, make_runner, prompt

from pdserve.engine import attention as attn
from pdserve.engine.attention import LayerKV, build_attention_metadata, paged_attention
from pdserve.engine.batch import BatchLimits, InvalidBatchError, SeqChunk, pack_chunks
from pdserve.engine.layers import RopeTable, apply_rope_, rope_cos_sin, rope_inv_freq
from pdserve.engine.model import LMHead
from pdserve.engine.moe import DenseExperts, MoEWeights, RouterParams, experts_forward, moe_forward, route
from pdserve.errors import ContextLengthError, InvalidRequestError

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


# ------------------------------------------------------------------ packing
def _reference_pack(chunks: list[SeqChunk], bs: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"tokens": [], "positions": [], "slots": [], "rows": []}
    for chunk in chunks:
        for i, tok in enumerate(chunk.token_ids):
            pos = chunk.start_pos + i
            out["tokens"].append(tok)
            out["positions"].append(pos)
            out["slots"].append(chunk.block_table[pos // bs] * bs + pos % bs)
        if chunk.need_logits:
            out["rows"].append(len(out["tokens"]) - 1)
    return out


@pytest.mark.parametrize(
    "chunks",
    [
        [SeqChunk([7], 0, [3]), SeqChunk([8], 9, [5, 1, 2]), SeqChunk([9], 4, [6, 0], False)],
        [SeqChunk([1, 2, 3], 0, [4]), SeqChunk([5], 6, [2, 7]), SeqChunk([6, 7], 3, [0, 9], False)],
    ],
    ids=["decode", "mixed"],
)
def test_pack_matches_reference(chunks: list[SeqChunk]) -> None:
    packed = pack_chunks(chunks, 4, BatchLimits(num_blocks=10, max_positions=64, vocab_size=100))
    want = _reference_pack(chunks, 4)
    assert packed.token_ids.tolist() == want["tokens"]
    assert packed.positions.tolist() == want["positions"]
    assert packed.slots.tolist() == want["slots"]
    assert packed.logit_rows.tolist() == want["rows"]
    assert packed.pure_decode == all(len(c.token_ids) == 1 for c in chunks)
    for i, chunk in enumerate(chunks):  # tables cover exactly end_pos, padded with block 0
        n = int(packed.table_lens[i])
        assert n == -(-chunk.end_pos // 4)
        assert packed.block_tables[i, :n].tolist() == chunk.block_table[:n]
        assert not packed.block_tables[i, n:].any()


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (SeqChunk([100], 0, [0]), InvalidRequestError, "vocabulary"),
        (SeqChunk([2**70], 0, [0]), InvalidRequestError, "vocabulary"),
        (SeqChunk([1], 8, [0, 1]), InvalidBatchError, "3 needed"),
        (SeqChunk([1], 0, [10]), InvalidBatchError, "outside"),
        (SeqChunk([1], -2, [0]), InvalidBatchError, "negative"),
        (SeqChunk([1], 64, list(range(10)) * 2), ContextLengthError, "64 positions"),
    ],
)
@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "mixed"])
def test_pack_errors_name_the_problem(
    bad: SeqChunk, error: type[Exception], match: str, decode_only: bool
) -> None:
    first = SeqChunk([1], 0, [0]) if decode_only else SeqChunk([1, 2], 0, [0])
    with pytest.raises(error, match=match):
        pack_chunks([first, bad], 4, BatchLimits(num_blocks=10, max_positions=64, vocab_size=100))


def test_mixed_metadata_maps_decode_rows_into_the_flat_batch() -> None:
    chunks = [
        SeqChunk([1, 2, 3], 0, [0]),
        SeqChunk([4], 5, [1, 2]),
        SeqChunk([5, 6], 2, [3]),
        SeqChunk([7], 0, [4]),
    ]
    meta = build_attention_metadata(chunks, 4, CPU)
    assert meta.decode is not None and not meta.decode.is_whole_batch
    assert meta.decode.token_idx.tolist() == [3, 6]
    assert meta.decode.block_ids.view(2, -1).tolist() == [[1, 2], [4, 0]]
    assert (meta.decode.mask.view(2, -1) == 0).sum(-1).tolist() == [6, 1]
    assert [(s.token_start, s.num_tokens, s.start_pos) for s in meta.prefills] == [(0, 3, 0), (4, 2, 2)]
    assert meta.max_position == 6


# ------------------------------------------------------------------ MoE
def _hf_moe(experts: int, top_k: int, shared: int, n_group: int, topk_group: int, scale: float) -> Any:
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = Glm4MoeConfig(
        hidden_size=48, moe_intermediate_size=16, n_routed_experts=experts, num_experts_per_tok=top_k,
        n_shared_experts=shared, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
        norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = Glm4MoeMoE(cfg).eval()
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape) * 0.2)
        moe.gate.e_score_correction_bias.copy_(torch.rand(experts) * 0.1)
    return moe


def _weights_of(moe: Any) -> MoEWeights:
    s = moe.shared_experts
    return MoEWeights(
        router=moe.gate.weight.detach(),
        correction_bias=moe.gate.e_score_correction_bias.detach(),
        gate_up=moe.experts.gate_up_proj.detach(),
        down=moe.experts.down_proj.detach(),
        shared_gate_up=torch.cat((s.gate_proj.weight, s.up_proj.weight)).detach(),
        shared_down=s.down_proj.weight.detach(),
    )


@pytest.mark.parametrize(
    ("experts", "top_k", "shared", "n_group", "topk_group"),
    [(8, 2, 1, 2, 1), (8, 3, 2, 4, 2), (16, 4, 1, 1, 1)],
)
@pytest.mark.parametrize("num_tokens", [1, 7, 40, 150])
def test_moe_paths_match_hf(
    experts: int, top_k: int, shared: int, n_group: int, topk_group: int, num_tokens: int
) -> None:
    hf = _hf_moe(experts, top_k, shared, n_group, topk_group, 2.5)
    w = _weights_of(hf)
    p = RouterParams(top_k, n_group, topk_group, True, 2.5)
    dense = DenseExperts.build(w)
    assert dense is not None and dense.num_shared == shared
    x = torch.randn(num_tokens, 48, generator=torch.Generator().manual_seed(num_tokens))
    with torch.no_grad():
        want = hf(x)
    grouped = experts_forward(x, *route(x, w.router, w.correction_bias, p), w) + F.linear(
        F.silu(F.linear(x, w.shared_gate_up[: 16 * shared])) * F.linear(x, w.shared_gate_up[16 * shared :]),
        w.shared_down,
    )
    torch.testing.assert_close(moe_forward(x, w, p, None), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, want, atol=1e-5, rtol=1e-5)
    dense.max_tokens = num_tokens  # force the dense path whatever the size
    torch.testing.assert_close(moe_forward(x, w, p, dense), want, atol=1e-5, rtol=1e-5)


def test_grouped_experts_loop_fallback_matches_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``torch._grouped_mm`` (older torch, or a non-CPU device) each active expert runs
    its own SwiGLU; both give the same result."""
    w = _weights_of(_hf_moe(8, 3, 1, 4, 2, 2.5))
    p = RouterParams(3, 4, 2, True, 2.5)
    x = torch.randn(90, 48, generator=torch.Generator().manual_seed(5))
    tw, ti = route(x, w.router, w.correction_bias, p)
    ti[:, 0] = 3  # leave some experts without tokens
    fast = experts_forward(x, tw, ti, w)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    torch.testing.assert_close(experts_forward(x, tw, ti, w), fast, atol=1e-6, rtol=1e-6)


def test_dense_experts_only_for_small_layers_and_batches() -> None:
    w = _weights_of(_hf_moe(8, 2, 1, 2, 1, 1.0))
    dense = DenseExperts.build(w)
    assert dense is not None and dense.max_tokens == 512 // 8
    big = MoEWeights(
        w.router, w.correction_bias, torch.zeros(8, 2 * 1024, 1024), torch.zeros(8, 1024, 1024), None, None
    )
    assert DenseExperts.build(big) is None


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_flat_decode_attention_matches_sdpa(kv_heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(kv_heads)
    heads, dim, bs, seqs = 4, 16, 4, 30
    layer = LayerKV(torch.randn(2, 200, bs, kv_heads, dim, generator=gen))
    chunks = [SeqChunk([1], 3 + 2 * i, [(7 * i + j) % 200 for j in range(i + 2)]) for i in range(seqs)]
    meta = build_attention_metadata(chunks, bs, CPU)
    q = torch.randn(seqs, heads, dim, generator=gen)
    k = v = torch.empty(seqs, kv_heads, dim)  # decode reads K/V from the pages only
    monkeypatch.setattr(attn, "DECODE_FLAT_MIN_SEQS", 1)
    flat = paged_attention(q, k, v, layer, meta, dim**-0.5)
    monkeypatch.setattr(attn, "DECODE_FLAT_MIN_SEQS", 10**9)
    fused = paged_attention(q, k, v, layer, meta, dim**-0.5)
    torch.testing.assert_close(flat, fused, atol=1e-5, rtol=1e-5)
    # reference: plain softmax attention per sequence over its own valid positions
    for s, chunk in enumerate(chunks):
        n = chunk.end_pos
        pos = torch.arange(n)
        blocks = torch.tensor(chunk.block_table)[pos // bs]
        keys, vals = layer.pages[0, blocks, pos % bs], layer.pages[1, blocks, pos % bs]  # [n, Hkv, D]
        group = heads // kv_heads
        scores = torch.einsum("hd,nhd->hn", q[s], keys.repeat_interleave(group, 1)) * dim**-0.5
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), vals.repeat_interleave(group, 1))
        torch.testing.assert_close(flat[s].view(heads, dim), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ RoPE and LM head
def test_rope_table_is_bit_identical_to_per_step_tables() -> None:
    table = RopeTable(16, 10000.0, 4096, CPU, torch.float32)
    positions = torch.tensor([0, 5, 1023, 1024, 3000, 7])
    cos, signed_sin = table.lookup(positions, 3001)
    want_cos, want_sin = rope_cos_sin(positions, rope_inv_freq(16, 10000.0, CPU), torch.float32)
    assert torch.equal(cos, want_cos)
    assert torch.equal(signed_sin[..., 8:], want_sin[..., 8:]) and torch.equal(
        signed_sin[..., :8], -want_sin[..., :8]
    )
    x = torch.randn(6, 3, 32)
    rot = x[..., :16]
    hf = rot * want_cos + torch.cat((-rot[..., 8:], rot[..., :8]), dim=-1) * want_sin  # HF rotate_half
    got = x.clone()
    apply_rope_(got, cos, signed_sin)
    assert torch.equal(got[..., :16], hf) and torch.equal(got[..., 16:], x[..., 16:])


def test_lm_head_matches_linear() -> None:
    weight = torch.randn(300, 24)
    head = LMHead(weight)
    for rows in (1, 5, 64):
        hidden = torch.randn(rows, 24)
        torch.testing.assert_close(head(hidden), F.linear(hidden, weight), atol=1e-5, rtol=1e-5)
    assert LMHead(weight.bfloat16())._packed is None  # only float32 is reordered


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def runner_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("kernels"), seed=11, use_qk_norm=True, n_group=2, topk_group=1
    )


def test_wide_decode_batch_matches_single_sequence_steps(runner_path: Path) -> None:
    """A 28-sequence decode step (flat attention, dense MoE) gives each sequence the logits it
    gets when decoded alone (SDPA attention, its own dense MoE)."""
    runner = make_runner(runner_path, block_size=4, num_blocks=200)
    prompts = [prompt(40 + i, 3 + i % 9) for i in range(28)]
    chunks = []
    for i, ids in enumerate(prompts):
        table = list(range(i * 6, i * 6 + 6))
        runner.run([SeqChunk(ids, 0, table)])
        chunks.append(SeqChunk([i + 1], len(ids), table))
    batched = runner.run(chunks)
    single = torch.cat([runner.run([c]) for c in chunks])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
