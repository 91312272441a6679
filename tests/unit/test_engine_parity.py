"""Greedy parity with HF ``generate`` through the whole LLMEngine (real ModelRunner): a batch of
mixed prompts, prefix-cache hits, chunked prefill, and preemption forced by a tiny KV pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_fakes import FakeTokenizer
from model_helpers import hf_greedy, load_hf, make_checkpoint, prompt

from pdserve.engine.config import EngineConfig
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
