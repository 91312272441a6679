"""The runner against the HF reference (transformers' Glm4MoeForCausalLM) on tiny random checkpoints:
full-sequence logits, greedy decoding token for token, batching, chunked prefill, prefix reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import (
    GreedyDriver,
    Seq,
    hf_greedy,
    hf_logits,
    load_hf,
    make_checkpoint,
    make_runner,
    prompt,
)

from pdserve.engine.attention import build_attention_metadata
from pdserve.engine.batch import SeqChunk
from pdserve.engine.model_runner import ModelRunner

pytestmark = pytest.mark.unit

CONFIGS: dict[str, dict[str, Any]] = {
    # plain: no QK norm, one expert group, one dense layer
    "base": {},
    # QK norm, group-limited routing (4 groups of 2, best 2 groups), two dense layers, no renorm
    "qknorm_groups": {
        "use_qk_norm": True,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 2,
        "num_hidden_layers": 4,
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.5,
    },
    # tied embeddings, 2 shared experts, 3 experts per token, 4 query heads on 1 KV head, new-style rope
    "tied_mqa": {
        "tie_word_embeddings": True,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "n_group": 2,
        "topk_group": 1,
        "num_key_value_heads": 1,
        "rope_theta": 500.0,
        "partial_rotary_factor": 0.25,
    },
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any, ModelRunner]:
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **CONFIGS[request.param])
    return path, load_hf(path), make_runner(path, block_size=4, num_blocks=96)


def all_logits(runner: ModelRunner, ids: list[int], block_table: list[int]) -> torch.Tensor:
    """Logits of every position of one prefill (model-level API: every row wanted)."""
    model = runner._model
    chunk = SeqChunk(ids, 0, block_table)
    with torch.inference_mode():
        meta = build_attention_metadata([chunk], runner.block_size, runner.device)
        hidden = model.forward(torch.tensor(ids), meta, runner.kv_storage, torch.arange(len(ids)))
        return model.compute_logits(hidden).float()


def test_full_sequence_logits_match_hf(setup: tuple[Path, Any, ModelRunner]) -> None:
    _, hf, runner = setup
    ids = prompt(1, 29)
    ref = hf_logits(hf, ids)
    got = all_logits(runner, ids, list(range(8)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the runner's own entry point gives the last row
    last = runner.run([SeqChunk(ids, 0, list(range(8)))])
    torch.testing.assert_close(last[0], ref[-1], atol=1e-4, rtol=1e-4)


def test_long_prefill_matches_hf(setup: tuple[Path, Any, ModelRunner]) -> None:
    """A prompt longer than the dense-MoE threshold (experts grouped per expert, see engine.moe)."""
    _, hf, runner = setup
    ids = prompt(14, 90)
    ref = hf_logits(hf, ids)
    got = all_logits(runner, ids, list(range(30, 53)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_token_by_token_decode_matches_hf_logits(setup: tuple[Path, Any, ModelRunner]) -> None:
    """Feeding the prompt one token per step (decode path, crossing block boundaries)."""
    _, hf, runner = setup
    ids = prompt(2, 11)
    ref = hf_logits(hf, ids)
    rows = [runner.run([SeqChunk([tok], pos, [10, 3, 7])])[0] for pos, tok in enumerate(ids)]
    torch.testing.assert_close(torch.stack(rows), ref, atol=1e-4, rtol=1e-4)


def test_greedy_matches_hf_generate(setup: tuple[Path, Any, ModelRunner]) -> None:
    _, hf, runner = setup
    ids = prompt(3, 13)  # block_size 4 does not divide 13
    want = hf_greedy(hf, ids, 12)
    driver = GreedyDriver(runner)
    seq = Seq(list(ids))
    driver.decode([seq], 12)
    assert seq.generated == want


def test_batched_mixed_prefill_and_decode(setup: tuple[Path, Any, ModelRunner]) -> None:
    """Several sequences of different lengths in one run call: whole prefills, a prefill split
    across steps (first part without logits), 1-token prompts and decodes in the same batch."""
    _, hf, runner = setup
    prompts = [prompt(10, 5), prompt(11, 14), prompt(12, 1), prompt(13, 9)]
    new_tokens = 6
    want = [hf_greedy(hf, p, new_tokens) for p in prompts]
    driver = GreedyDriver(runner)
    a, b, c, d = (Seq(list(p)) for p in prompts)
    # step 1: A whole, B first 6 tokens (no logits), C (1-token prompt)
    driver.step([(a, driver.chunk(a)), (b, driver.chunk(b, 6, need_logits=False)), (c, driver.chunk(c))])
    # step 2: A decode, B rest of prompt, C decode, D whole prompt
    driver.step([(s, driver.chunk(s)) for s in (a, b, c, d)])
    # then everybody decodes together until each has new_tokens
    while any(len(s.generated) < new_tokens for s in (a, b, c, d)):
        live = [s for s in (a, b, c, d) if len(s.generated) < new_tokens]
        driver.step([(s, driver.chunk(s)) for s in live])
    assert [a.generated, b.generated, c.generated, d.generated] == want


def test_chunked_prefill_across_steps(setup: tuple[Path, Any, ModelRunner]) -> None:
    _, hf, runner = setup
    ids = prompt(4, 23)
    ref = hf_logits(hf, ids)
    driver = GreedyDriver(runner)
    seq = Seq(list(ids))
    ends: list[int] = []
    rows: list[torch.Tensor] = []
    for n in (7, 3, 8, 5):  # chunk ends 7, 10, 18, 23 — never aligned with block_size 4
        chunk = driver.chunk(seq, n)
        rows.append(runner.run([chunk])[0])
        ends.append(chunk.end_pos)
    torch.testing.assert_close(torch.stack(rows), ref[[e - 1 for e in ends]], atol=1e-4, rtol=1e-4)
    seq.tokens.append(int(rows[-1].argmax()))
    seq.generated.append(seq.tokens[-1])
    driver.decode([seq], 7)
    assert seq.generated == hf_greedy(hf, ids, 8)


def test_prefix_cache_hit_reuses_blocks(setup: tuple[Path, Any, ModelRunner]) -> None:
    """A second sequence whose block table starts with the first's full blocks starts at
    start_pos > 0 and still decodes exactly like HF on its whole prompt."""
    _, hf, runner = setup
    shared = prompt(5, 12)  # 3 full blocks of 4
    first = [*shared, *prompt(6, 3)]
    second = [*shared, *prompt(7, 6)]
    driver = GreedyDriver(runner)
    s1 = Seq(list(first))
    driver.decode([s1], 2)
    s2 = Seq(list(second), blocks=list(s1.blocks[:3]), cached=12)
    driver.step([(s2, driver.chunk(s2)), (s1, driver.chunk(s1))])  # prefix-hit prefill + a decode
    driver.decode([s1, s2], 5)
    assert s2.generated == hf_greedy(hf, second, 6)
    assert s1.generated == hf_greedy(hf, first, 8)


def test_kv_pages_hold_hf_keys_and_values(setup: tuple[Path, Any, ModelRunner]) -> None:
    """The pool's slot for position p holds HF's (post-RoPE) key and value of p, per layer."""
    _, hf, runner = setup
    ids = prompt(8, 10)
    table = [41, 17, 5]
    runner.run([SeqChunk(ids, 0, table)])
    with torch.no_grad():
        cache = hf(torch.tensor([ids]), use_cache=True).cache
    bs = runner.block_size
    pos = torch.arange(len(ids))
    blocks = torch.tensor(table)[pos // bs]
    for layer in range(runner.model_config.num_hidden_layers):
        k = runner.kv_storage[layer, 0, blocks, pos % bs]  # [T, Hkv, D]
        v = runner.kv_storage[layer, 1, blocks, pos % bs]
        torch.testing.assert_close(k, cache.layers[layer].keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, cache.layers[layer].values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_bfloat16_is_sane(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, seed=3, use_qk_norm=True, n_group=2, topk_group=1)
    fp32 = make_runner(path, num_blocks=16)
    bf16 = make_runner(path, num_blocks=16, dtype="bfloat16")
    assert bf16.kv_storage.dtype == torch.bfloat16
    ids = prompt(9, 17)
    chunk = [SeqChunk(ids, 0, list(range(5)))]
    ref, got = fp32.run(chunk), bf16.run(chunk)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, ref).item() > 0.99
    hf = load_hf(path, torch.bfloat16)
    assert torch.nn.functional.cosine_similarity(got[0], hf_logits(hf, ids)[-1], dim=0).item() > 0.99
    driver = GreedyDriver(bf16)
    seq = Seq(list(ids))
    driver.decode([seq], 4)
    assert len(seq.generated) == 4
