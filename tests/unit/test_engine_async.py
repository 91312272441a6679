"""AsyncLLMEngine: streaming, cancellation and abort free pages, PD calls, failures reach callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from engine_fakes import FakeRunner, make_engine, reference_greedy
from prometheus_client import CollectorRegistry

from pdserve.engine.async_engine import AsyncLLMEngine
from pdserve.engine.llm_engine import EngineStepError
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import AbortedError, ContextLengthError, InvalidRequestError, OverloadedError

pytestmark = pytest.mark.unit


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture
async def aengine() -> AsyncIterator[AsyncLLMEngine]:
    eng = AsyncLLMEngine(make_engine(32, 4, max_model_len=128), call_timeout_s=5.0, idle_wait_s=0.5)
    yield eng
    assert eng.shutdown(5.0)


async def collect(stream: AsyncIterator[RequestOutput]) -> tuple[list[int], list[RequestOutput]]:
    ids: list[int] = []
    outs: list[RequestOutput] = []
    async for out in stream:
        ids += out.new_token_ids
        outs.append(out)
    return ids, outs


async def used_blocks(eng: AsyncLLMEngine) -> int:
    return await eng.call(lambda e: e.block_manager.num_used)


async def wait_idle(eng: AsyncLLMEngine, timeout_s: float = 5.0) -> None:
    """Poll (bounded) until the engine has no request and no referenced block."""
    for _ in range(int(timeout_s / 0.01)):
        if not await eng.call(lambda e: e.has_unfinished() or e.block_manager.num_used > 0):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"engine still busy after {timeout_s}s: {eng.load()}")
    await eng.call(lambda e: e.block_manager.check_invariants())


async def test_concurrent_streams_match_reference(aengine: AsyncLLMEngine) -> None:
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9, 10], [11]]
    results = await asyncio.gather(
        *(collect(aengine.generate(f"r{i}", p, greedy(8))) for i, p in enumerate(prompts))
    )
    for p, (ids, outs) in zip(prompts, results, strict=True):
        assert ids == reference_greedy(p, 8)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
    await wait_idle(aengine)
    assert aengine.load().free_blocks == 32


async def test_validation_error_raises_before_first_delta(aengine: AsyncLLMEngine) -> None:
    with pytest.raises(ContextLengthError):
        await collect(aengine.generate("x", list(range(2, 60)) * 3, greedy(2)))
    with pytest.raises(InvalidRequestError):
        await collect(aengine.generate("x", [], greedy(2)))
    await wait_idle(aengine)


async def test_leaving_the_stream_aborts_and_frees(aengine: AsyncLLMEngine) -> None:
    stream = aengine.generate("c", [2, 3, 4, 5, 6], greedy(100))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(aengine)


async def test_cancelling_the_consumer_task_frees(aengine: AsyncLLMEngine) -> None:
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in aengine.generate("t", [2, 3, 4, 5, 6], greedy(100)):
            got_one.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(aengine)


async def test_abort_ends_the_stream(aengine: AsyncLLMEngine) -> None:
    outs: list[RequestOutput] = []

    async def consume() -> None:
        async for out in aengine.generate("a", [2, 3, 4], greedy(100)):
            outs.append(out)
            if len(outs) == 2:
                assert await aengine.abort("a")

    await asyncio.wait_for(consume(), 5)
    assert outs[-1].finish_reason == "abort" and outs[-1].finished
    assert not await aengine.abort("a")
    await wait_idle(aengine)


async def test_prefill_holds_until_release_and_cancel_frees(aengine: AsyncLLMEngine) -> None:
    res = await aengine.prefill("p", [2, 3, 4, 5, 6], greedy(1))
    assert res.first_token_id == reference_greedy([2, 3, 4, 5, 6], 1)[0]
    assert await used_blocks(aengine) == len(res.block_ids) == 2
    assert await aengine.release("p")
    await wait_idle(aengine)
    # a prefill whose caller goes away before it finishes must not leak pages
    task = asyncio.create_task(aengine.prefill("q", list(range(2, 100)), greedy(1)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(aengine)


async def test_reserve_adopt_release(aengine: AsyncLLMEngine) -> None:
    blocks = await aengine.reserve("d", 3)
    assert len(blocks) == 1
    with pytest.raises(OverloadedError):
        await aengine.reserve("huge", 127)
    assert await aengine.release("d")
    blocks = await aengine.reserve("d", 3)
    # the fake runner reads the prompt back from the pages: write them as a transfer would
    await aengine.call(lambda e: _fill_pages(e.runner, blocks, [2, 3, 4]))
    ids, _ = await collect(aengine.adopt("d", [2, 3, 4], 9, greedy(4)))
    assert ids[0] == 9 and ids[1:] == reference_greedy([2, 3, 4, 9], 3)
    await wait_idle(aengine)


def _fill_pages(runner: object, blocks: list[int], tokens: list[int]) -> None:
    assert isinstance(runner, FakeRunner)
    kv = runner.kv_storage[0]
    bs = runner.layout.block_size
    for p, tok in enumerate(tokens):
        kv[0, blocks[p // bs], p % bs] = float(tok + 1)
        kv[1, blocks[p // bs], p % bs] = float(p + 1)


async def test_step_failure_reaches_the_caller_and_the_loop_survives(aengine: AsyncLLMEngine) -> None:
    runner = aengine.engine.runner
    assert isinstance(runner, FakeRunner)
    runner.fail_next = RuntimeError("boom")
    with pytest.raises(EngineStepError, match="boom"):
        await collect(aengine.generate("f", [2, 3], greedy(3)))
    ids, _ = await collect(aengine.generate("g", [2, 3], greedy(3)))
    assert ids == reference_greedy([2, 3], 3)
    await wait_idle(aengine)


async def test_shutdown_fails_waiters_and_later_calls() -> None:
    eng = AsyncLLMEngine(make_engine(32, 4, max_model_len=128))
    stream = eng.generate("s", [2, 3], greedy(100))
    first = await stream.__anext__()
    assert first.new_token_ids
    assert eng.shutdown(5.0) and not eng.running
    with pytest.raises(AbortedError):
        async for _ in stream:
            pass
    with pytest.raises(AbortedError):
        await eng.reserve("x", 3)
    assert eng.engine.block_manager.num_used == 0


async def test_metrics_are_exported() -> None:
    registry = CollectorRegistry()
    eng = AsyncLLMEngine(make_engine(32, 4, max_model_len=128), registry=registry)
    try:
        await collect(eng.generate("m", [2, 3], greedy(5)))
        await eng.call(lambda e: None)  # one more loop iteration refreshes the gauges
        assert registry.get_sample_value("pdserve:engine_generated_tokens_total") == 5
        assert (registry.get_sample_value("pdserve:engine_steps_total") or 0) >= 5
        assert registry.get_sample_value("pdserve:engine_kv_blocks", {"state": "used"}) == 0
        assert registry.get_sample_value("pdserve:engine_requests", {"state": "running"}) == 0
    finally:
        eng.shutdown(5.0)
