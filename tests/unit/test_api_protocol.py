"""Request validation -> OpenAI error bodies and status codes (in-process TestClient, no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from pdserve.api.errors import BodySizeLimitMiddleware
from pdserve.api.protocol import ChatCompletionRequest, error_param, parse_request
from pdserve.api.responses import ErrorResponse
from pdserve.api.testing import CharTokenizer, ScriptedBackend, make_app
from pdserve.errors import InvalidRequestError, OverloadedError

pytestmark = pytest.mark.unit

MODEL = "glm-test"
USER = [{"role": "user", "content": "hi"}]


class Typed(BaseModel):
    x: int


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = make_app(ScriptedBackend(CharTokenizer()), model=MODEL, model_max_len=256, max_body_bytes=4096)

    @app.post("/typed")
    async def typed(body: Typed) -> dict[str, int]:
        return {"x": body.x}

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    @app.post("/busy")
    async def busy() -> None:
        raise OverloadedError("no capacity")

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **kw}


def assert_error(resp: Any, status: int, param: str | None = None, fragment: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    ErrorResponse.model_validate(body)
    err = body["error"]
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    assert fragment in err["message"], err
    return err


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": USER}, "model", "Field required"),
        (chat(messages=[]), "messages", "at least 1"),
        ({"model": MODEL}, "messages", "Field required"),
        (chat(temperature="0.5"), "temperature", ""),
        (chat(temperature=2.5), "temperature", "less than or equal to 2"),
        (chat(top_p=0), "top_p", "greater than 0"),
        (chat(top_k=-2), "top_k", ""),
        (chat(max_tokens=0), "max_tokens", ""),
        (chat(n=2), "n", "only one choice"),
        (chat(presence_penalty=0.5), "presence_penalty", "not supported"),
        (chat(frequency_penalty=-1), "frequency_penalty", "not supported"),
        (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", ""),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
            "messages[0].content[0].type",
            "",
        ),
        (chat(messages=[{"role": "user"}]), "messages[0]", "content is required"),
        (chat(logprobs=False, top_logprobs=2), "top_logprobs", "requires logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs", ""),
        (chat(stream_options={"include_usage": True}), "stream_options", "only allowed when stream"),
        (chat(response_format={"type": "json_object"}), "response_format", "not supported"),
        (chat(stop=[""]), "stop", "non-empty"),
        (chat(stop=["s"] * 65), "stop", "at most"),
        (chat(seed=-1), "seed", "non-negative"),
        (chat(stream="yes"), "stream", ""),
        (chat(chat_template_kwargs={"enable_thinking": "no"}), "chat_template_kwargs.enable_thinking", ""),
        (chat(tool_choice="sometimes"), "tool_choice", ""),
        (chat(tool_choice="required"), "tool_choice", "requires a non-empty tools"),
        (
            chat(
                tools=[
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": 5}}},
                        },
                    }
                ]
            ),
            "tools[0].function.parameters",
            "invalid JSON Schema",
        ),
        (chat(bootstrap_host="10.0.0.1"), "bootstrap_room", "go together"),
        (chat(bootstrap_host="h", bootstrap_room=-1), "bootstrap_room", ""),
        (chat(bootstrap_host="h", bootstrap_room=1, bootstrap_port=70000), "bootstrap_port", ""),
        (chat(max_tokens=250), "max_tokens", "maximum context length"),
        (chat(messages=[{"role": "user", "content": "x" * 300}]), "messages", "maximum context length"),
    ],
)
def test_chat_validation_errors_are_400(
    client: TestClient, body: dict[str, Any], param: str, fragment: str
) -> None:
    assert_error(client.post("/v1/chat/completions", json=body), 400, param, fragment)


def test_context_length_error_type(client: TestClient) -> None:
    err = assert_error(
        client.post("/v1/chat/completions", json=chat(max_completion_tokens=1000)),
        400,
        "max_completion_tokens",
    )
    assert err["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions", json=chat(some_future_field={"a": 1}, logit_bias=None, user="u")
    )
    assert resp.status_code == 200, resp.text


def test_wrong_model_is_404(client: TestClient) -> None:
    err = assert_error(client.post("/v1/chat/completions", json={**chat(), "model": "gpt-4"}), 404, "model")
    assert err["type"] == "not_found_error"


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"model": "m",}'])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 400, None, "malformed JSON")


def test_non_object_body_is_400(client: TestClient) -> None:
    assert_error(client.post("/v1/chat/completions", json=[1, 2]), 400, None, "JSON object")


def test_fastapi_body_validation_is_400_not_422(client: TestClient) -> None:
    assert_error(client.post("/typed", json={"x": "nope"}), 400, "x")
    assert_error(
        client.post("/typed", content=b"{oops", headers={"content-type": "application/json"}),
        400,
        None,
        "malformed JSON",
    )


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, None, "no such route")
    assert_error(client.get("/v1/chat/completions"), 405, None, "not allowed")


def test_unexpected_exception_is_500_without_details(client: TestClient) -> None:
    err = assert_error(client.post("/boom"), 500)
    assert "secret" not in err["message"]


def test_pdserve_errors_keep_their_status(client: TestClient) -> None:
    err = assert_error(client.post("/busy"), 503, None, "no capacity")
    assert err["type"] == "overloaded_error"


def test_declared_body_over_limit_is_413(client: TestClient) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 5000}])
    assert_error(client.post("/v1/chat/completions", json=big), 413, None, "larger than the limit")


def test_streamed_body_over_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "glm-test", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(client.post("/v1/chat/completions", content=chunks()), 413, None, "larger than the limit")


def test_streamed_body_under_limit_passes(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "glm-test", "messages": '
        yield b'[{"role": "user", "content": "hi"}]}'

    assert client.post("/v1/chat/completions", content=chunks()).status_code == 200


def test_body_limit_middleware_alone_answers_413() -> None:
    app = FastAPI()  # no error handlers: the middleware itself must answer

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=10)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/echo", content=iter([b'{"a": "', b"z" * 50, b'"}'])).status_code == 413
        assert c.post("/echo", json={"a": "z" * 50}).status_code == 413
        assert c.post("/echo", json={"a": 1}).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "logprobs": 30}, "logprobs"),
        ({"model": MODEL, "prompt": [-1]}, "prompt[0]"),
        ({"model": MODEL}, "prompt"),
    ],
)
def test_completion_validation_errors(client: TestClient, body: dict[str, Any], param: str) -> None:
    assert_error(client.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": ["a", "b"]}, "text"),
        ({"input_ids": [[1], [2]]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"text": "a", "sampling_params": {"regex": "x+"}}, "sampling_params.regex"),
        ({"text": "a", "sampling_params": {"n": 2}}, "sampling_params.n"),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"text": "a", "sampling_params": {"max_new_tokens": 1000}}, "sampling_params.max_new_tokens"),
        ({"text": "a", "top_logprobs_num": 3}, "top_logprobs_num"),
        ({"text": "a", "bootstrap_room": 2**63}, "bootstrap_room"),
    ],
)
def test_native_validation_errors(client: TestClient, body: dict[str, Any], param: str) -> None:
    assert_error(client.post("/generate", json=body), 400, param)


def test_parse_request_directly() -> None:
    req = parse_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "extra": 1}', ChatCompletionRequest
    )
    assert req.model_extra == {"extra": 1}
    with pytest.raises(InvalidRequestError):
        parse_request(b"[]", ChatCompletionRequest)


def test_error_param_drops_union_tags() -> None:
    assert error_param(("body", "messages", 0, "content", "list[TextContentPart]", 1, "type")) == (
        "messages[0].content[1].type"
    )
    assert error_param(("tool_choice", "literal['none','auto','required']")) == "tool_choice"
    assert error_param(("temperature", "float")) == "temperature"
