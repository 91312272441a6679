"""Chat rendering: message conversion, tool_choice variants, thinking switches, output processing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve.api.chat import ChatOutputProcessor, ChatRenderer, to_template_messages
from pdserve.api.protocol import ChatCompletionRequest
from pdserve.api.reasoning import Glm45ReasoningParser
from pdserve.api.testing import CharTokenizer
from pdserve.api.tool_parsers import TOOL_FORMATS, merge_tool_call_deltas
from pdserve.errors import InvalidRequestError

pytestmark = pytest.mark.unit

TOOK = CharTokenizer()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def req(**kw: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    body.update(kw)
    return ChatCompletionRequest.model_validate(body)


def renderer(fmt: str | None = "glm45") -> ChatRenderer:
    return ChatRenderer(TOOK, tool_format=TOOL_FORMATS[fmt] if fmt else None)


def test_plain_prompt_and_ids_round_trip() -> None:
    p = renderer().render(req())
    assert p.text == "[gMASK]<sop><|user|>\nWeather in Paris?<|assistant|>"
    assert TOOK.decode(p.ids) == p.text
    assert not p.parse_tools and p.reasoning_start == "auto" and p.tool_start == "text"


def test_enable_thinking_false_closes_the_think_block() -> None:
    p = renderer().render(req(chat_template_kwargs={"enable_thinking": False}))
    assert p.text.endswith("<|assistant|>\n<think></think>")
    assert p.reasoning_start == "content"


def test_clear_thinking_passes_through() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "why"},
        {"role": "user", "content": "q2"},
    ]
    kept = renderer().render(req(messages=msgs, chat_template_kwargs={"clear_thinking": False})).text
    dropped = renderer().render(req(messages=msgs)).text
    assert "<think>why</think>" in kept and "why" not in dropped


def test_message_conversion() -> None:
    messages = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "r",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "X"}'},
                        },
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Y"}}},
                    ],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            ],
        }
    ).messages
    out = to_template_messages(messages)
    assert out[0] == {"role": "system", "content": "sys"}
    assert out[1] == {"role": "user", "content": "a\nb"}
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "X"}
    assert out[2]["tool_calls"][1]["function"]["arguments"] == {"city": "Y"}
    assert out[2]["reasoning_content"] == "r" and out[2]["content"] == ""
    assert out[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_history_tool_arguments_are_400(arguments: str) -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
            ],
        },
    ]
    with pytest.raises(InvalidRequestError) as info:
        renderer().render(req(messages=msgs))
    assert info.value.details["param"] == "messages[1].tool_calls[0].function.arguments"


def test_tool_choice_auto_default_puts_tools_in_prompt() -> None:
    p = renderer().render(req(tools=[WEATHER]))
    assert '"name": "get_weather"' in p.text and p.parse_tools and p.tool_start == "text"


def test_tool_choice_none_hides_tools_and_disables_parsing() -> None:
    p = renderer().render(req(tools=[WEATHER], tool_choice="none"))
    assert "get_weather" not in p.text and not p.parse_tools


@pytest.mark.parametrize("fmt", ["glm45", "glm47"])
def test_tool_choice_required_forces_a_call(fmt: str) -> None:
    p = renderer(fmt).render(req(tools=[WEATHER], tool_choice="required"))
    assert p.text.endswith("<think></think>" + TOOL_FORMATS[fmt].forced_prefix(None))
    assert p.tool_start == "name" and p.reasoning_start == "content" and p.forced_name is None
    assert TOOK.decode(p.ids) == p.text


@pytest.mark.parametrize("fmt", ["glm45", "glm47"])
def test_tool_choice_named_forces_that_function(fmt: str) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    p = renderer(fmt).render(req(tools=[WEATHER], tool_choice=choice))
    assert p.text.endswith(TOOL_FORMATS[fmt].forced_prefix("get_weather"))
    assert p.tool_start == "args" and p.forced_name == "get_weather"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ],
)
def test_tool_choice_errors(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        renderer().render(req(**kw))
    assert info.value.details["param"] == param


def test_forced_choice_without_a_tool_parser_is_400() -> None:
    with pytest.raises(InvalidRequestError, match="no tool-call parser"):
        renderer(None).render(req(tools=[WEATHER], tool_choice="required"))
    p = renderer(None).render(req(tools=[WEATHER]))
    assert "get_weather" in p.text and not p.parse_tools


def test_template_that_leaves_think_open_gets_closed_before_a_forced_call() -> None:
    tok = CharTokenizer(template="{{ messages[0].content }}<|assistant|><think>")
    p = ChatRenderer(tok, tool_format=TOOL_FORMATS["glm47"]).render(
        req(tools=[WEATHER], tool_choice="required")
    )
    assert p.text.endswith("<|assistant|><think></think><tool_call>")
    assert p.reasoning_start == "content"
    open_p = ChatRenderer(tok, tool_format=TOOL_FORMATS["glm47"]).render(req())
    assert open_p.reasoning_start == "reasoning"


def test_template_errors_are_400() -> None:
    tok = CharTokenizer(template="{{ raise_me() }}")
    with pytest.raises(InvalidRequestError, match="chat template"):
        ChatRenderer(tok, tool_format=None).render(req())


def test_output_processor_reasoning_then_tool_call() -> None:
    p = renderer().render(req(tools=[WEATHER]))
    text = (
        "<think>I should call it.</think>\nSure.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n</tool_call>"
    )
    for chunks in ([text], list(text)):
        proc = ChatOutputProcessor(p, Glm45ReasoningParser)
        parts = [proc.feed(c) for c in chunks] + [proc.finish()]
        reasoning = "".join(r for r, _, _ in parts)
        content = "".join(c for _, c, _ in parts)
        calls = merge_tool_call_deltas([d for _, _, ds in parts for d in ds])
        assert reasoning == "I should call it."
        assert content == "Sure."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert proc.has_tool_calls


def test_output_processor_without_reasoning_separation_keeps_markup_in_content() -> None:
    proc = ChatOutputProcessor(renderer().render(req()), None)
    assert proc.feed("<think>x</think>y") == ("", "<think>x</think>y", [])
    assert proc.finish() == ("", "", [])
