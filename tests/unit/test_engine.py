"""LLMEngine over a fake paged runner: batching, chunked prefill, prefix cache, preemption,
stops, seeds, logprobs, validation, aborts and step failures. No leaked block anywhere."""

from __future__ import annotations

import math

import pytest
import torch
from engine_fakes import (
    EOS,
    PIECES,
    FakeDetokenizer,
    FakeRunner,
    drain,
    make_engine,
    piece,
    ref_logits,
    reference_greedy,
)

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import EngineStepError, LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import OutputProcessor, Sequence
from pdserve.errors import ConfigError, ContextLengthError, InvalidRequestError

pytestmark = pytest.mark.unit

PROMPTS = [[5, 6, 7, 8, 9], list(range(2, 21)), [3], [5, 6, 7, 8, 9, 10, 11, 12, 13], list(range(30, 60))]


def greedy(n: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def run_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[object]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    res = drain(engine)
    assert_no_leak(engine)
    return res


def assert_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_used == 0, f"{bm.num_used} blocks still referenced"
    assert not engine.has_unfinished() and engine.request_ids() == []


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"max_num_batched_tokens": 8, "max_num_seqs": 4},  # chunked prefill, capped batch
        {"max_num_seqs": 1},
        {"enable_prefix_caching": False},
    ],
)
def test_greedy_matches_reference(config: dict[str, int]) -> None:
    engine = make_engine(64, 4, **config)
    res = run_all(engine, PROMPTS, greedy())
    for i, p in enumerate(PROMPTS):
        ids, text, reason, _ = res[f"r{i}"]
        assert ids == reference_greedy(p, 12), i
        assert reason == "length" and text == "".join(piece(t) for t in ids if t not in (0, 1))


def test_chunked_prefill_really_chunks() -> None:
    engine = make_engine(64, 4, max_num_batched_tokens=8, max_num_seqs=2)
    run_all(engine, [list(range(2, 40))], greedy(3))
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    sizes = [sum(len(c.token_ids) for c in step) for step in runner.steps]
    assert max(sizes) <= 8 and sizes[:4] == [8, 8, 8, 8]


def test_prefix_cache_hits_are_reported_and_correct() -> None:
    engine = make_engine(64, 4)
    shared = list(range(2, 19))  # 17 tokens: 4 full blocks
    run_all(engine, [shared], greedy(4))
    engine.add_request("b", [*shared, 40, 41], greedy(6))
    res = drain(engine)
    assert res["b"][0] == reference_greedy([*shared, 40, 41], 6)
    assert res["b"][3][0].num_cached_tokens == 16
    assert_no_leak(engine)


def test_preemption_by_recompute_keeps_outputs_exact() -> None:
    # 8 blocks of 4 tokens, prompts 6 tokens + 14 outputs = 20 tokens (5 blocks) each: must preempt
    engine = make_engine(8, 4, max_model_len=32)
    prompts = [[2 + i, 3, 4, 5, 6, 7 + i] for i in range(4)]
    res = run_all(engine, prompts, greedy(14))
    assert engine.load().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert res[f"r{i}"][0] == reference_greedy(p, 14)


def test_seeded_sampling_is_reproducible_independent_of_batch_and_preemption() -> None:
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = make_engine(64, 4)
    alone.add_request("x", [9, 8, 7, 6, 5], p)
    ref = drain(alone)["x"][0]
    crowded = make_engine(10, 4, max_model_len=20, seed=99)
    for i in range(3):
        crowded.add_request(f"o{i}", [2 + i, 3, 4], SamplingParams(max_tokens=12, ignore_eos=True))
    crowded.add_request("x", [9, 8, 7, 6, 5], p)
    res = drain(crowded)
    assert res["x"][0] == ref
    assert crowded.load().num_preemptions > 0
    assert_no_leak(crowded)


def test_stop_conditions() -> None:
    prompt = [5, 6, 7]
    ref = reference_greedy(prompt, 10)
    engine = make_engine(64, 4)
    engine.add_request("tok", prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[3]]))
    engine.add_request("len", prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    res = drain(engine)
    k = ref.index(ref[3])
    assert res["tok"][0] == ref[: k + 1] and res["tok"][2] == "stop"
    assert res["tok"][3][-1].matched_stop == ref[3]
    # the stop token's id is returned, its text is not
    assert res["tok"][1] == "".join(piece(t) for t in ref[:k] if t not in (0, 1))
    assert res["len"][0] == ref[:2] and res["len"][2] == "length"
    # EOS: make the token greedy produces at step 2 the engine's EOS, then ignore_eos disables it
    eos_engine = make_engine(64, 4, eos=(ref[2],))
    eos_engine.add_request("eos", prompt, SamplingParams(max_tokens=10, temperature=0))
    eos_engine.add_request("ign", prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    res = drain(eos_engine)
    assert res["eos"][2] == "stop" and res["eos"][0][-1] == ref[2]
    assert res["ign"][0] == ref
    assert_no_leak(eos_engine)


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    prompt = [11, 12, 13]
    ref = reference_greedy(prompt, 20)
    pieces = [piece(t) for t in ref]
    text = "".join(p for t, p in zip(ref, pieces, strict=True) if t not in (0, 1))
    # a stop string made of the end of one piece and the start of the next
    j = next(i for i in range(3, 19) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1 and ref[i] > 1)
    stop = pieces[j][-1] + pieces[j + 1][:2]
    cut = text.index(stop)
    engine = make_engine(64, 4)
    engine.add_request(
        "s", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    )
    ids, out_text, reason, outs = drain(engine)["s"]
    assert ids[-1] == ref[len(ids) - 1]
    assert reason == "stop" and out_text == text[:cut] and outs[-1].matched_stop == stop
    assert all(stop not in o.new_text for o in outs)
    assert_no_leak(engine)


def test_output_processor_holds_back_possible_stop_prefixes() -> None:
    ids = {p: PIECES.index(p) for p in ("ST", "OP", "a", "hello", " world", "end>", "</")}
    params = SamplingParams(max_tokens=50, stop=["STOP", "</end>"])
    seq = Sequence("p", [2, 3], 2, params, 50, 0)
    det = FakeDetokenizer(True)
    proc = OutputProcessor(seq, det.add, det.finish, frozenset([EOS]))

    def feed(name: str) -> tuple[str, str | None]:
        seq.token_ids.append(ids[name])
        out = proc.process(ids[name], None)
        return out.new_text, out.finish_reason

    assert feed("hello") == ("hello", None)
    assert feed("ST") == ("", None)  # could be the start of "STOP"
    assert feed("a") == ("STa", None)  # it was not: released
    assert feed("</") == ("", None)
    assert feed(" world") == ("</ world", None)
    assert feed("ST") == ("", None)
    assert feed("OP") == ("", "stop")  # "STOP" completed across two tokens: trimmed, never emitted
    seq2 = Sequence("q", [2], 1, params, 2, 0)
    proc2 = OutputProcessor(seq2, det.add, det.finish, frozenset([EOS]))
    seq2.token_ids.append(ids["</"])
    assert proc2.process(ids["</"], None).new_text == ""
    seq2.token_ids.append(ids["a"])
    last = proc2.process(ids["a"], None)
    assert (last.new_text, last.finish_reason) == ("</a", "length")  # held text flushed at the end


def test_context_limit_clips_max_tokens() -> None:
    engine = make_engine(16, 4, max_model_len=12)
    engine.add_request("c", list(range(2, 10)), greedy(100))  # 8 prompt tokens: 4 more fit
    ids, _, reason, outs = drain(engine)["c"]
    assert len(ids) == 4 and reason == "length" and outs[-1].num_output_tokens == 4
    with pytest.raises(ContextLengthError):
        engine.add_request("long", list(range(2, 14)), greedy())
    assert_no_leak(engine)


def test_validation_errors() -> None:
    engine = make_engine(16, 4)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("a", [], greedy())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("a", [1, 64], greedy())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("a", [-1], greedy())
    with pytest.raises(InvalidRequestError, match="integers"):
        engine.add_request("a", [1.5], greedy())  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError):
        engine.add_request("", [1], greedy())
    engine.add_request("a", [1, 2], greedy())
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.add_request("a", [1, 2], greedy())
    bad = greedy()
    bad.top_p = 0.0  # mutated after construction: re-validated on admission
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.add_request("b", [1, 2], bad)
    assert engine.abort("a")
    drain(engine)
    assert_no_leak(engine)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="at most one"):
        EngineConfig.build(model="x", num_blocks=4, kv_cache_memory_gb=1.0)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig.build(model="x", max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ConfigError, match="bogus: Extra inputs"):
        EngineConfig.build(model="x", bogus=1)
    cfg = EngineConfig.build(model="x", block_size=16, kv_cache_memory_gb=0.001)
    assert cfg.resolve_num_blocks(1024, 64) == int(0.001 * 2**30) // 1024
    with pytest.raises(ConfigError, match="cannot hold"):
        cfg.resolve_num_blocks(2**20, 4096)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        EngineConfig.build(model="x", max_model_len=9000).resolve_max_model_len(8192)
    default = EngineConfig.build(model="x", max_num_seqs=2)
    assert default.resolve_num_blocks(1024, 100) == 2 * 7  # what 2 full-length sequences need
    with pytest.raises(ConfigError, match="cannot hold"):
        make_engine(4, 4, max_model_len=100)


def test_logprobs_in_outputs() -> None:
    engine = make_engine(64, 4)
    prompt = [4, 5, 6]
    engine.add_request("l", prompt, greedy(3, logprobs=2))
    _, _, _, outs = drain(engine)["l"]
    ctx = list(prompt)
    for out in outs:
        (lp,) = out.new_logprobs
        ref = torch.log_softmax(ref_logits(ctx), -1)
        assert lp.token_id == out.new_token_ids[0]
        assert math.isclose(lp.logprob, ref.max().item(), rel_tol=1e-5) and len(lp.top) == 2
        ctx.append(lp.token_id)


@pytest.mark.parametrize("state", ["waiting", "prefilling", "running", "held"])
def test_abort_in_every_state_frees_every_block(state: str) -> None:
    engine = make_engine(32, 4, max_num_batched_tokens=4, max_num_seqs=4)
    engine.add_request("other", [2, 3], greedy(30))
    target = list(range(2, 14))
    engine.add_request("t", target, greedy(30) if state != "held" else greedy(1), hold_kv=state == "held")
    steps = {"waiting": 0, "prefilling": 2, "running": 6, "held": 6}[state]
    for _ in range(steps):
        engine.step()
    seq = engine.scheduler.get("t")
    if state == "prefilling":
        assert seq is not None and 0 < seq.num_computed_tokens < len(target)
    elif state == "running":
        assert seq is not None and seq.num_output_tokens > 0
    elif state == "held":
        assert seq is None and len(engine.held_blocks("t")) == 3
    assert engine.abort("t")
    assert not engine.abort("t")
    outs = drain(engine)
    if state != "held":
        assert outs["t"][2] == "abort"
    assert_no_leak(engine)


def test_step_failure_is_typed_and_engine_recovers() -> None:
    engine = make_engine(32, 4)
    engine.add_request("a", [2, 3, 4], greedy(4))
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    runner.fail_next = RuntimeError("device lost")
    with pytest.raises(EngineStepError, match="device lost") as info:
        engine.step()
    assert info.value.details["request_ids"] == ["a"]
    assert engine.abort("a")
    engine.add_request("b", [2, 3, 4], greedy(4))
    res = drain(engine)
    assert res["b"][0] == reference_greedy([2, 3, 4], 4) and res["a"][2] == "abort"
    assert_no_leak(engine)


def test_load_and_offline_generate() -> None:
    engine = make_engine(32, 4, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", [2, 3, 4, 5, 6], greedy(5))
    load = engine.load()
    assert (load.num_running, load.num_waiting, load.waiting_prefill_tokens) == (0, 3, 15)
    assert load.free_blocks == load.total_blocks == 32
    engine.step()
    load = engine.load()
    assert (load.num_running, load.num_waiting) == (2, 1)
    drain(engine)
    done = engine.generate([[2, 3], [4, 5, 6]], [greedy(3), greedy(2)])
    assert [c.output_ids for c in done] == [reference_greedy([2, 3], 3), reference_greedy([4, 5, 6], 2)]
    assert done[0].finish_reason == "length"
    assert_no_leak(engine)
