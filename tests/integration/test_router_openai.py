"""OpenAI endpoints through the router (pdserve.api over PD dispatch) with fake worker processes:
chat/completions JSON and SSE, GLM reasoning and tool-call parsing, usage, and OpenAI-format 4xx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from pdserve.api.testing import CharTokenizer
from pdserve.router.testing import FakeWorkerProcess, running_router, start_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPLY = ("<think>check the weather</think>Let me look.<tool_call>get_weather\n<arg_key>city</arg_key>\n"
         "<arg_value>Paris</arg_value>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FakeWorkerProcess]]:
    d = tmp_path_factory.mktemp("router-openai")
    workers = start_workers(["prefill", "decode"], d, d)
    yield workers
    for w in workers:
        w.close()


@pytest.fixture
async def router(pair: list[FakeWorkerProcess]) -> AsyncIterator[httpx.AsyncClient]:
    for w in pair:
        await w.reset(reply=REPLY)
    async with running_router(workers=pair, tokenizer=CharTokenizer(), max_model_len=512,
                              max_body_bytes=65536) as r, httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        yield c


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "weather in Paris?"}],
            "max_tokens": 200, **kw}


async def test_models(router: httpx.AsyncClient) -> None:
    data = (await router.get("/v1/models")).json()["data"]
    assert [m["id"] for m in data] == ["fake-model"]


async def test_chat_json_with_reasoning_and_tool_calls(
    router: httpx.AsyncClient, pair: list[FakeWorkerProcess]
) -> None:
    res = await router.post("/v1/chat/completions", json=chat(tools=TOOLS))
    assert res.status_code == 200, res.text
    out = res.json()
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] == "check the weather"
    assert msg["content"] == "Let me look."
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and orjson.loads(call["function"]["arguments"]) == {
        "city": "Paris"}
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 0
    prefill, decode = pair
    assert (await prefill.stats())["rooms"] == (await decode.stats())["rooms"], "went through PD"


async def test_chat_stream(router: httpx.AsyncClient) -> None:
    res = await router.post("/v1/chat/completions",
                            json=chat(stream=True, tools=TOOLS, stream_options={"include_usage": True}))
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    events = [e[6:] for e in res.content.split(b"\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert reasoning == "check the weather" and content == "Let me look."
    assert "<tool_call>" not in content and calls and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_completions_json_and_stream(router: httpx.AsyncClient) -> None:
    body = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 4}
    res = await router.post("/v1/completions", json=body)
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["choices"][0]["text"] == REPLY[:12] and out["choices"][0]["finish_reason"] == "length"
    res = await router.post("/v1/completions", json={**body, "stream": True})
    events = [e[6:] for e in res.content.split(b"\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1] if orjson.loads(e)["choices"])
    assert text == REPLY[:12]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", chat(model="nope"), 404, "model"),
        ("/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
        ("/v1/chat/completions", chat(top_p=1.5), 400, "top_p"),
        ("/v1/chat/completions", {"model": "fake-model"}, 400, "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 600}]), 400, None),
        ("/v1/chat/completions", chat(max_tokens=10_000), 400, "max_tokens"),
        ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": 5}}]), 400, None),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ],
)
async def test_bad_requests_are_openai_4xx(router: httpx.AsyncClient, path: str, body: dict[str, Any],
                                           status: int, param: str | None) -> None:
    res = await router.post(path, json=body)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param


async def test_malformed_and_oversize(router: httpx.AsyncClient) -> None:
    res = await router.post("/v1/chat/completions", content=b"{oops",
                            headers={"content-type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"
    res = await router.post("/v1/chat/completions", content=b"{" + b" " * 70_000 + b"}")
    assert res.status_code == 413
    assert (await router.get("/v1/nothing")).status_code == 404


async def test_stream_disconnect_aborts_the_legs(
    router: httpx.AsyncClient, pair: list[FakeWorkerProcess]
) -> None:
    _, decode = pair
    await decode.configure(token_delay_s=0.2)
    async with router.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as res:
        async for _ in res.aiter_bytes():
            break
    st = await decode.wait_stats(aborted=1)
    assert st["completed"] == 0
    metrics = (await router.get("/metrics")).text
    assert "pdserve:router_inflight_requests 0.0" in metrics
    assert 'pdserve:router_requests_total{outcome="cancelled",route="chat"} 1.0' in metrics
