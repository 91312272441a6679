"""The API layer with the engine's real tokenizer and chat template (the embedded default model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pdserve.api.backend import ChatTokenizer
from pdserve.api.chat import ChatOutputProcessor, ChatRenderer
from pdserve.api.protocol import ChatCompletionRequest
from pdserve.api.reasoning import Glm45ReasoningParser
from pdserve.api.testing import ScriptedBackend, make_app
from pdserve.api.tool_parsers import TOOL_FORMATS, merge_tool_call_deltas
from pdserve.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

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
OUTPUT = (
    "<think>The user wants weather.</think>\nLet me look that up.\n<tool_call>get_weather\n"
    "<arg_key>city</arg_key>\n<arg_value>Zürich</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
    "</tool_call>"
)


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def req(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Zürich?"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_engine_tokenizer_satisfies_the_protocol(tok: Tokenizer) -> None:
    assert isinstance(tok, ChatTokenizer)


@pytest.mark.parametrize(
    ("kw", "tail", "tool_start"),
    [
        ({}, "<|assistant|>", "text"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "<|assistant|>\n<think></think>", "text"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "<think></think>\n<tool_call>", "name"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            "<think></think>\n<tool_call>get_weather\n",
            "args",
        ),
    ],
)
def test_render_with_the_real_template(
    tok: Tokenizer, kw: dict[str, Any], tail: str, tool_start: str
) -> None:
    prompt = ChatRenderer(tok, tool_format=TOOL_FORMATS["glm45"]).render(req(**kw))
    assert prompt.text.startswith("[gMASK]<sop>") and prompt.text.endswith(tail)
    assert prompt.tool_start == tool_start
    assert tok.decode(prompt.ids) == prompt.text
    if "tools" in kw:
        assert '"name": "get_weather"' in prompt.text


def test_history_with_tool_calls_renders(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Bern", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text = (
        ChatRenderer(tok, tool_format=TOOL_FORMATS["glm45"])
        .render(req(messages=messages, tools=[WEATHER]))
        .text
    )
    assert "<tool_call>get_weather" in text and "<arg_value>Bern</arg_value>" in text
    assert "<arg_value>2</arg_value>" in text and "<|observation|>" in text
    assert "<think>think</think>" in text  # reasoning of the current tool loop is kept


def test_token_by_token_detokenised_output_parses(tok: Tokenizer) -> None:
    prompt = ChatRenderer(tok, tool_format=TOOL_FORMATS["glm45"]).render(req(tools=[WEATHER]))
    ids = tok.encode(OUTPUT)
    detok = tok.detokenizer(skip_special_tokens=False)
    proc = ChatOutputProcessor(prompt, Glm45ReasoningParser)
    parts = [proc.feed(detok.add(t)) for t in ids]
    parts.append(proc.feed(detok.finish()))
    parts.append(proc.finish())
    assert "".join(r for r, _, _ in parts) == "The user wants weather."
    assert "".join(c for _, c, _ in parts) == "Let me look that up."
    calls = merge_tool_call_deltas([d for _, _, ds in parts for d in ds])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Zürich", "days": 3})
    ]


def test_serving_end_to_end_with_the_real_tokenizer(tok: Tokenizer) -> None:
    pieces = [OUTPUT[i : i + 7] for i in range(0, len(OUTPUT), 7)]
    backend = ScriptedBackend(tok, pieces=pieces)
    app = make_app(backend, tok, model="glm", model_max_len=4096)
    with TestClient(app) as c:
        body = c.post(
            "/v1/chat/completions",
            json={**req().model_dump(exclude_none=True), "model": "glm", "tools": [WEATHER]},
        ).json()
        logprobs = c.post(
            "/v1/chat/completions",
            json={
                "model": "glm",
                "messages": [{"role": "user", "content": "x"}],
                "logprobs": True,
                "top_logprobs": 1,
            },
        ).json()
    msg = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert msg["reasoning_content"] == "The user wants weather." and msg["content"] == "Let me look that up."
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich", "days": 3}
    assert backend.calls[0].params.skip_special_tokens is False
    assert body["usage"]["prompt_tokens"] == len(backend.calls[0].prompt_ids)
    tokens = [e["token"] for e in logprobs["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == OUTPUT  # per-token texts of a byte-level BPE join back to the text
