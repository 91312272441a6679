"""PD hooks: prefill with held KV, decode reserve/adopt/release. The decode engine's pages are
filled by copying the prefill engine's pages (what a transfer does), and the result must equal
a colocated engine token for token — greedy and seeded sampling."""

from __future__ import annotations

import pytest
from engine_fakes import drain, make_engine, reference_greedy

from pdserve.engine.llm_engine import LLMEngine, PrefillOutput, PrefillResult
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ContextLengthError, InvalidRequestError, OverloadedError

pytestmark = pytest.mark.unit

PROMPT = list(range(2, 16))  # 14 tokens: 3 full blocks of 4 + 2


def prefill(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> PrefillResult:
    engine.add_request(rid, prompt, params, hold_kv=True)
    outs = drain(engine)[rid][3]
    (last,) = outs
    assert isinstance(last, PrefillOutput) and last.prefill is not None and last.finished
    return last.prefill


def copy_pages(src: LLMEngine, src_blocks: list[int], dst: LLMEngine, dst_blocks: list[int]) -> None:
    kv_src, kv_dst = src.runner.kv_storage, dst.runner.kv_storage
    for s, d in zip(src_blocks, dst_blocks, strict=False):
        kv_dst[:, :, d] = kv_src[:, :, s]


def pd_generate(params: SamplingParams, prompt: list[int] = PROMPT) -> tuple[list[int], LLMEngine, LLMEngine]:
    p_engine = make_engine(32, 4)
    d_engine = make_engine(32, 4)
    d_engine.add_request("noise", [30, 31, 32], SamplingParams(max_tokens=3, temperature=0))
    drain(d_engine)  # so the decode side's block ids differ from the prefill side's
    dst = d_engine.reserve("r", len(prompt))
    assert len(dst) == 4  # 14 prompt tokens + the first output token
    res = prefill(p_engine, "r", prompt, params)
    assert res.block_ids == p_engine.held_blocks("r") and len(res.block_ids) == 4
    assert res.num_prompt_tokens == len(prompt)
    copy_pages(p_engine, res.block_ids, d_engine, dst)
    assert p_engine.release("r") and not p_engine.release("r")
    assert p_engine.block_manager.num_used == 0
    d_engine.adopt("r", prompt, res.first_token_id, params, res.first_logprob, res.num_cached_tokens)
    outs = drain(d_engine)["r"]
    assert outs[3][0].new_token_ids == [res.first_token_id]
    return outs[0], p_engine, d_engine


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=77, ignore_eos=True),
    ],
)
def test_pd_equals_colocated(params: SamplingParams) -> None:
    colo = make_engine(32, 4)
    colo.add_request("r", PROMPT, params)
    expected = drain(colo)["r"][0]
    if params.greedy:
        assert expected == reference_greedy(PROMPT, 10)
    got, p_engine, d_engine = pd_generate(params)
    assert got == expected
    for e in (p_engine, d_engine):
        e.block_manager.check_invariants()
        assert e.block_manager.num_used == 0


def test_adopted_prompt_enters_decode_prefix_cache() -> None:
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    _, _, d_engine = pd_generate(params)
    d_engine.add_request("again", [*PROMPT, 50], params)
    outs = drain(d_engine)["again"]
    assert outs[3][0].num_cached_tokens == 12  # the prompt's 3 full blocks
    assert outs[0] == reference_greedy([*PROMPT, 50], 3)


def test_reserve_validation_and_overload() -> None:
    d = make_engine(8, 4, max_model_len=32)
    with pytest.raises(ContextLengthError):
        d.reserve("big", 32)
    with pytest.raises(InvalidRequestError):
        d.reserve("zero", 0)
    first = d.reserve("a", 20)  # 6 blocks
    assert len(first) == 6 and d.load().held_blocks == 6 and d.load().num_reserved == 1
    with pytest.raises(OverloadedError):
        d.reserve("b", 8)  # needs 3, only 2 left
    with pytest.raises(InvalidRequestError, match="in use"):
        d.reserve("a", 4)
    with pytest.raises(InvalidRequestError, match="in use"):
        d.add_request("a", [2], SamplingParams())
    assert d.release("a") and not d.release("a")
    assert d.block_manager.num_used == 0


def test_adopt_errors_leave_the_reservation() -> None:
    d = make_engine(16, 4)
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(InvalidRequestError, match="no reservation"):
        d.adopt("x", [2, 3], 5, params)
    d.reserve("x", 3)
    with pytest.raises(InvalidRequestError, match="reserved"):
        d.adopt("x", [2, 3], 5, params)
    with pytest.raises(InvalidRequestError, match="first_token"):
        d.adopt("x", [2, 3, 4], 999, params)
    assert d.load().num_reserved == 1
    assert d.abort("x")  # abort covers reservations too
    assert d.block_manager.num_used == 0 and d.load().num_reserved == 0


def test_adopt_first_token_finishing_the_request() -> None:
    d = make_engine(16, 4)
    d.reserve("e", 3)
    d.adopt("e", [2, 3, 4], 0, SamplingParams(max_tokens=8), first_logprob=-0.5)  # 0 is EOS
    ids, _, reason, outs = drain(d)["e"]
    assert ids == [0] and reason == "stop" and outs[0].new_logprobs is None
    d.reserve("m", 3)
    d.adopt("m", [2, 3, 4], 7, SamplingParams(max_tokens=1, logprobs=0), first_logprob=-0.25)
    ids, text, reason, outs = drain(d)["m"]
    assert ids == [7] and reason == "length" and text == "f"
    assert outs[0].new_logprobs is not None and outs[0].new_logprobs[0].logprob == -0.25
    assert d.block_manager.num_used == 0 and not d.has_unfinished()


def test_hold_kv_forces_one_token_and_reports_logprob() -> None:
    p = make_engine(16, 4)
    res = prefill(p, "h", [2, 3, 4, 5, 6], SamplingParams(max_tokens=50, temperature=0))
    assert res.first_token_id == reference_greedy([2, 3, 4, 5, 6], 1)[0]
    assert res.first_logprob < 0 and res.finish_reason in ("length", "stop")
    assert p.load().num_held == 1 and p.load().held_blocks == 2
    with pytest.raises(InvalidRequestError):
        p.held_blocks("nope")
    assert p.release("h") and p.block_manager.num_used == 0
