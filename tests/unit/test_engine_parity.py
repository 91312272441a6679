"""Greedy parity with HF ``generate`` through the whole LLMEngine (real ModelRunner): a batch of
mixed prompts, prefix-cache hits, chunked prefill, and preemption forced by a tiny KV pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_fakes import FakeTokenizer
from model_helpers import hf_greedy, load_hf, make_checkpoint, prompt

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_layout import allocate_kv_storage
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

N_NEW = 10
SHARED = prompt(100, 21)
PROMPTS = [prompt(1, 7), prompt(2, 30), [*SHARED, *prompt(3, 5)], prompt(4, 1), [*SHARED, *prompt(5, 9)]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    path = make_checkpoint(tmp_path_factory.mktemp("engine-parity"), seed=3)
    hf = load_hf(path)
    expected = {i: hf_greedy(hf, p, N_NEW) for i, p in enumerate(PROMPTS)}
    return path, expected


def engine_for(path: Path, **overrides: Any) -> LLMEngine:
    cfg = EngineConfig(model=str(path), block_size=4, show_progress=False, **{"num_blocks": 256, **overrides})
    return LLMEngine(cfg, tokenizer=FakeTokenizer())


def run(engine: LLMEngine, order: list[int]) -> dict[int, list[int]]:
    params = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)
    done = engine.generate([PROMPTS[i] for i in order], params)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used == 0
    return {i: c.output_ids for i, c in zip(order, done, strict=True)}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_num_batched_tokens": 16, "max_num_seqs": 3},  # chunked prefill, staggered admission
        {"num_blocks": 14, "max_model_len": 48},  # 56 slots for 5 sequences: forces preemption
    ],
    ids=["batched", "chunked", "preempted"],
)
def test_engine_greedy_matches_hf(
    checkpoint: tuple[Path, dict[int, list[int]]], overrides: dict[str, int]
) -> None:
    path, expected = checkpoint
    engine = engine_for(path, **overrides)
    assert run(engine, list(range(len(PROMPTS)))) == expected
    if "num_blocks" in overrides:
        assert engine.load().num_preemptions > 0


def test_prefix_cache_hits_match_hf(checkpoint: tuple[Path, dict[int, list[int]]]) -> None:
    path, expected = checkpoint
    engine = engine_for(path)
    assert run(engine, [2]) == {2: expected[2]}
    done = engine.generate([PROMPTS[4]], SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True))
    assert done[0].num_cached_tokens == 20  # 5 full blocks of the shared 21-token prefix
    assert done[0].output_ids == expected[4]


def test_pd_adopt_on_the_real_model_matches_hf(checkpoint: tuple[Path, dict[int, list[int]]]) -> None:
    """Prefill on one engine, copy its pages into a caller-allocated pool of another (as the shm
    transport does), adopt there: decode continues exactly like HF's uninterrupted generate."""
    path, expected = checkpoint
    p_engine = engine_for(path)
    layout = p_engine.runner.layout
    d_engine = LLMEngine(
        EngineConfig(model=str(path), block_size=4, max_model_len=256, show_progress=False),
        kv_storage=allocate_kv_storage(layout, 64),
        tokenizer=FakeTokenizer(),
    )
    params = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)
    prompt_ids = PROMPTS[1]
    dst = d_engine.reserve("r", len(prompt_ids))
    p_engine.add_request("r", prompt_ids, params, hold_kv=True)
    while p_engine.has_unfinished():
        p_engine.step()
    res = p_engine.prefill_result("r")
    src_kv, dst_kv = p_engine.runner.kv_storage, d_engine.runner.kv_storage
    for s, d in zip(res.block_ids, dst, strict=False):
        dst_kv[:, :, d] = src_kv[:, :, s]
    assert p_engine.release("r")
    d_engine.adopt("r", prompt_ids, res.first_token_id, params, res.first_logprob)
    out: list[int] = []
    while d_engine.has_unfinished():
        for o in d_engine.step():
            out += o.new_token_ids
    assert out == expected[1]
    assert d_engine.block_manager.num_used == 0 and p_engine.block_manager.num_used == 0
