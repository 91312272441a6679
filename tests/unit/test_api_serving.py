"""OpenAIServing over a scripted backend: responses, SSE framing, usage, logprobs, errors, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pdserve.api.backend import RequestContext
from pdserve.api.protocol import ChatCompletionRequest
from pdserve.api.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from pdserve.api.serving import OpenAIServing
from pdserve.api.testing import CharTokenizer, ScriptedBackend, make_app
from pdserve.engine.outputs import RequestOutput
from pdserve.errors import OverloadedError, RequestTimeoutError, WorkerError

pytestmark = pytest.mark.unit

TOK = CharTokenizer()
MODEL = "glm-test"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
TOOL_OUTPUT = [
    "<think>Need",
    " weather.</think>",
    "\nChecking.",
    "\n<tool_call>get_",
    "weather\n<arg_key>city",
    "</arg_key>\n<arg_value>Par",
    "is</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2",
    "</arg_value>\n</tool_call>",
]


def client_for(backend: ScriptedBackend, **kw: Any) -> TestClient:
    return TestClient(make_app(backend, TOK, model=MODEL, **kw), raise_server_exceptions=False)


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], **kw}


def sse(resp: Any) -> list[Any]:
    """The JSON payloads of an SSE response; asserts the framing and the final [DONE]."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    text = resp.text
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for ev in events[:-1]:
        assert ev.startswith("data: ") and "\n" not in ev, ev
        payloads.append(ev[len("data: ") :])
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


# ---------------------------------------------------------------------------------------- chat


def test_chat_non_streaming() -> None:
    backend = ScriptedBackend(TOK, pieces=["Hello", " there"], cached_tokens=3)
    with client_for(backend) as c:
        body = c.post("/v1/chat/completions", json=chat_body()).json()
    resp = ChatCompletionResponse.model_validate(body)
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL
    choice = resp.choices[0]
    assert choice.message.content == "Hello there" and choice.message.reasoning_content is None
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    call = backend.calls[0]
    assert resp.usage.prompt_tokens == len(call.prompt_ids)
    assert resp.usage.completion_tokens == len("Hello there")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert (
        resp.usage.prompt_tokens_details is not None and resp.usage.prompt_tokens_details.cached_tokens == 3
    )
    assert call.closed and not call.cancelled_seen


def test_chat_sampling_params_and_context() -> None:
    backend = ScriptedBackend(TOK)
    body = chat_body(
        temperature=0.2,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        stop="END",
        max_tokens=12,
        rid="req-1",
        bootstrap_host="10.0.0.2",
        bootstrap_port=8998,
        bootstrap_room=42,
        routed_dp_rank=1,
        stop_token_ids=[3],
        ignore_eos=True,
    )
    with client_for(backend, sampling_defaults={"temperature": 0.6, "top_p": 0.95}) as c:
        assert c.post("/v1/chat/completions", json=body).json()["id"] == "chatcmpl-req-1"
        c.post("/v1/chat/completions", json=chat_body())
    p = backend.calls[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens) == (0.2, 0.9, 5, 0.1, 7, 12)
    assert p.stop == ["END"] and p.stop_token_ids == [3] and p.ignore_eos and p.logprobs is None
    assert p.skip_special_tokens is False  # the reasoning parser needs the think tags
    ctx = backend.calls[0].ctx
    assert (
        ctx.request_id == "req-1"
        and ctx.prompt_text is not None
        and ctx.prompt_text.endswith("<|assistant|>")
    )
    assert ctx.bootstrap is not None and (ctx.bootstrap.host, ctx.bootstrap.port, ctx.bootstrap.room) == (
        "10.0.0.2",
        8998,
        42,
    )
    assert ctx.extras == {"routed_dp_rank": 1}
    d = backend.calls[1].params
    assert (d.temperature, d.top_p) == (0.6, 0.95)  # server defaults
    assert d.max_tokens == 4096 - len(backend.calls[1].prompt_ids)  # fills the context


def test_chat_reasoning_and_tool_calls_non_streaming() -> None:
    backend = ScriptedBackend(TOK, pieces=TOOL_OUTPUT)
    with client_for(backend) as c:
        body = c.post("/v1/chat/completions", json=chat_body(tools=[WEATHER])).json()
    msg = ChatCompletionResponse.model_validate(body).choices[0]
    assert msg.finish_reason == "tool_calls"
    assert msg.message.reasoning_content == "Need weather."
    assert msg.message.content == "Checking."
    assert msg.message.tool_calls is not None and len(msg.message.tool_calls) == 1
    call = msg.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}


def test_chat_streaming_reasoning_and_tool_calls() -> None:
    backend = ScriptedBackend(TOK, pieces=TOOL_OUTPUT)
    with client_for(backend) as c:
        chunks = sse(c.post("/v1/chat/completions", json=chat_body(tools=[WEATHER], stream=True)))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch)
        assert "usage" not in ch
    ids = {ch["id"] for ch in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "Need weather." and content == "Checking."
    tool_deltas = [t for d in deltas for t in d.get("tool_calls", [])]
    assert tool_deltas[0]["id"].startswith("call_") and tool_deltas[0]["function"]["name"] == "get_weather"
    assert sum(1 for t in tool_deltas if "id" in t) == 1  # announced once
    args = "".join(t["function"].get("arguments", "") for t in tool_deltas)
    assert json.loads(args) == {"city": "Paris", "days": 2}
    assert len([t for t in tool_deltas if t["function"].get("arguments")]) > 1  # streamed incrementally
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])
    for d in deltas:
        for v in (d.get("content", ""), d.get("reasoning_content", "")):
            assert "<" not in v  # no markup leaks


def test_chat_streaming_include_usage() -> None:
    backend = ScriptedBackend(TOK, pieces=["a", "b", "c"])
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with client_for(backend) as c:
        chunks = sse(c.post("/v1/chat/completions", json=body))
    assert all(ch["usage"] is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["prompt_tokens"] == len(backend.calls[0].prompt_ids)
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]) == "abc"


def test_chat_length_finish_and_matched_stop() -> None:
    with client_for(ScriptedBackend(TOK, pieces=["x"], finish_reason="length")) as c:
        assert (
            c.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["finish_reason"] == "length"
        )
    with client_for(ScriptedBackend(TOK, pieces=["x"], matched_stop="END")) as c:
        choice = c.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == "END"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(stream: bool) -> None:
    backend = ScriptedBackend(TOK, pieces=["Hi", "é"])
    with client_for(backend) as c:
        resp = c.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2, stream=stream))
        if stream:
            entries = [
                e
                for ch in sse(resp)
                if ch["choices"][0]["logprobs"]
                for e in ch["choices"][0]["logprobs"]["content"]
            ]
        else:
            entries = resp.json()["choices"][0]["logprobs"]["content"]
    assert backend.calls[0].params.logprobs == 2
    assert [e["token"] for e in entries] == ["H", "i", "é"]
    assert entries[2]["bytes"] == list("é".encode())
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"] for e in entries)
    assert entries[0]["logprob"] == pytest.approx(-0.1)


def test_chat_thinking_disabled_gives_plain_content() -> None:
    backend = ScriptedBackend(TOK, pieces=["\nJust ", "the answer"])
    body = chat_body(chat_template_kwargs={"enable_thinking": False})
    with client_for(backend) as c:
        msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert msg == {
        "role": "assistant",
        "content": "Just the answer",
        "reasoning_content": None,
        "tool_calls": None,
    }


def test_separate_reasoning_false_keeps_think_in_content() -> None:
    backend = ScriptedBackend(TOK, pieces=["<think>r</think>", "c"])
    with client_for(backend) as c:
        msg = c.post("/v1/chat/completions", json=chat_body(separate_reasoning=False)).json()["choices"][0]
    assert msg["message"]["content"] == "<think>r</think>c"


# ------------------------------------------------------------------------------ completions


def test_completion_non_streaming_with_echo_and_logprobs() -> None:
    backend = ScriptedBackend(TOK, pieces=["ab", "c"])
    body = {"model": MODEL, "prompt": "Say:", "echo": True, "logprobs": 1, "max_tokens": 5}
    with client_for(backend) as c:
        data = c.post("/v1/completions", json=body).json()
    resp = CompletionResponse.model_validate(data)
    choice = resp.choices[0]
    assert choice.text == "Say:abc" and choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.tokens == ["a", "b", "c"]
    assert choice.logprobs.text_offset == [4, 5, 6]
    assert choice.logprobs.top_logprobs == [
        {"a": pytest.approx(-0.1)},
        {"b": pytest.approx(-0.2)},
        {"c": pytest.approx(-0.1)},
    ]
    assert resp.id.startswith("cmpl-") and resp.usage is not None and resp.usage.prompt_tokens == 4
    assert backend.calls[0].params.max_tokens == 5 and backend.calls[0].params.skip_special_tokens


def test_completion_streaming_token_id_prompt() -> None:
    backend = ScriptedBackend(TOK, pieces=["x", "y"])
    body = {
        "model": MODEL,
        "prompt": [100, 101, 102],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client_for(backend) as c:
        chunks = sse(c.post("/v1/completions", json=body))
    assert backend.calls[0].prompt_ids == [100, 101, 102]
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == "xy"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 and chunks[-1]["choices"] == []
    assert all(ch["object"] == "text_completion" for ch in chunks)


def test_completion_default_max_tokens_is_16() -> None:
    backend = ScriptedBackend(TOK)
    with client_for(backend) as c:
        c.post("/v1/completions", json={"model": MODEL, "prompt": "p"})
    assert backend.calls[0].params.max_tokens == 16


def test_models() -> None:
    with client_for(ScriptedBackend(TOK)) as c:
        data = c.get("/v1/models").json()
    models = ModelList.model_validate(data)
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "sglang" and models.data[0].max_model_len == 4096


# --------------------------------------------------------------------------- errors / cleanup


@pytest.mark.parametrize("stream", [False, True])
def test_error_before_first_output_is_an_http_status(stream: bool) -> None:
    backend = ScriptedBackend(TOK, error_at=0, error=OverloadedError("queue full"))
    with client_for(backend) as c:
        resp = c.post("/v1/chat/completions", json=chat_body(stream=stream))
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "overloaded_error"
    assert backend.calls[0].closed


def test_error_mid_stream_is_an_error_event_then_done() -> None:
    backend = ScriptedBackend(TOK, pieces=["a", "b", "c"], error_at=2, error=OverloadedError("worker lost"))
    with client_for(backend) as c:
        chunks = sse(c.post("/v1/chat/completions", json=chat_body(stream=True)))
    ErrorResponse.model_validate(chunks[-1])
    assert chunks[-1]["error"]["code"] == 503 and "worker lost" in chunks[-1]["error"]["message"]
    assert backend.calls[0].closed and backend.calls[0].ctx.cancelled


def test_unexpected_backend_exception_mid_stream_hides_details() -> None:
    backend = ScriptedBackend(TOK, pieces=["a", "b"], error_at=1, error=RuntimeError("secret"))
    with client_for(backend) as c:
        chunks = sse(c.post("/v1/completions", json={"model": MODEL, "prompt": "p", "stream": True}))
    assert chunks[-1]["error"]["code"] == 500 and "secret" not in chunks[-1]["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_backend_that_never_finishes_is_502(stream: bool) -> None:
    backend = ScriptedBackend(TOK, pieces=["a"], omit_final=True)
    with client_for(backend) as c:
        resp = c.post("/v1/chat/completions", json=chat_body(stream=stream))
    if stream:
        assert sse(resp)[-1]["error"]["code"] == 502
    else:
        assert resp.status_code == 502


def test_abort_finish_is_an_error() -> None:
    with client_for(ScriptedBackend(TOK, pieces=["a"], finish_reason="abort")) as c:
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 502


@pytest.mark.parametrize("stream", [False, True])
def test_first_output_timeout_is_408_and_frees_the_backend(stream: bool) -> None:
    backend = ScriptedBackend(TOK, hang_at=0)
    with client_for(backend, first_output_timeout_s=0.05) as c:
        resp = c.post("/v1/chat/completions", json=chat_body(stream=stream))
    assert resp.status_code == 408 and resp.json()["error"]["type"] == "timeout_error"
    assert backend.calls[0].closed and backend.calls[0].ctx.cancelled


def test_inter_output_timeout_mid_stream() -> None:
    backend = ScriptedBackend(TOK, pieces=["a", "b"], hang_at=1)
    with client_for(backend, output_timeout_s=0.05) as c:
        chunks = sse(c.post("/v1/chat/completions", json=chat_body(stream=True)))
    assert chunks[-1]["error"]["code"] == 408
    assert backend.calls[0].closed and backend.calls[0].ctx.cancelled


async def test_request_deadline_bounds_every_wait() -> None:
    backend = ScriptedBackend(TOK, hang_at=0)
    serving = OpenAIServing(backend, TOK, served_model_name=MODEL, model_max_len=4096, request_timeout_s=0.05)
    with pytest.raises(RequestTimeoutError):
        await serving.chat(ChatCompletionRequest.model_validate(chat_body()))
    assert backend.calls[0].closed and backend.calls[0].ctx.cancelled


async def test_client_disconnect_mid_stream_closes_backend_and_cancels() -> None:
    backend = ScriptedBackend(TOK, pieces=["a", "b", "c", "d"])
    serving = OpenAIServing(backend, TOK, served_model_name=MODEL, model_max_len=4096)
    ctx = RequestContext()
    stream = await serving.chat(ChatCompletionRequest.model_validate(chat_body(stream=True)), ctx)
    assert not isinstance(stream, dict)
    first = await anext(stream)
    assert first.startswith(b"data: ")
    await stream.aclose()  # what the server does when the client goes away
    assert backend.calls[0].closed and ctx.cancelled and backend.calls[0].cancelled_seen


async def test_context_cancel_and_wait() -> None:
    ctx = RequestContext(request_id="r", deadline=None)
    assert not await ctx.wait_cancelled(0.01)
    assert ctx.time_left() is None
    ctx.cancel("first")
    ctx.cancel("second")
    assert ctx.cancel_reason == "first" and await ctx.wait_cancelled(0.01) and await ctx.is_cancelled()

    async def disconnected() -> bool:
        return True

    ctx2 = RequestContext(disconnect_check=disconnected)
    assert await ctx2.is_cancelled() and ctx2.cancel_reason == "client disconnected"


class _StubbornBackend:
    """Swallows the cancellation of a timed-out wait and/or hangs while being closed."""

    def __init__(self, *, swallow: bool, hang_on_close: bool) -> None:
        self.swallow, self.hang_on_close = swallow, hang_on_close
        self.closed = False

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: Any, *, ctx: RequestContext
    ) -> AsyncIterator[RequestOutput]:
        try:
            yield RequestOutput(request_id, [1], "a")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self.swallow:
                    raise WorkerError("converted cancellation") from None
                raise
            yield RequestOutput(request_id, [2], "b", finished=True, finish_reason="stop")
        finally:
            if self.hang_on_close:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(30)
            self.closed = True


@pytest.mark.parametrize(("swallow", "hang_on_close"), [(True, False), (False, True), (True, True)])
async def test_timeouts_hold_against_stubborn_backends(swallow: bool, hang_on_close: bool) -> None:
    backend = _StubbornBackend(swallow=swallow, hang_on_close=hang_on_close)
    serving = OpenAIServing(
        backend, TOK, served_model_name=MODEL, model_max_len=4096, output_timeout_s=0.05, close_timeout_s=0.05
    )
    with pytest.raises(RequestTimeoutError):
        await serving.chat(ChatCompletionRequest.model_validate(chat_body()))
    assert backend.closed
    assert asyncio.current_task() is not None and asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
