"""Chat templating: pdserve's renderer equals transformers' apply_chat_template, and the GLM-4.5
template produces GLM's prompt format."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from pdserve.engine.chat_render import ChatTemplateRenderer
from pdserve.engine.default_model import ensure_default_model
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import InvalidRequestError

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city (温度 in °C)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


def _call(name: str, args: dict[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


CASES: dict[str, dict[str, Any]] = {
    "single_user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system_user": {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "你好，世界 🎉"}]},
    "multi_turn_reasoning": {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "  add them  "},
        {"role": "user", "content": "and 3+3?"},
    ]},
    "reasoning_in_content": {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nhidden steps\n</think>\n\nanswer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>kept?</think>final"},
    ]},
    "reasoning_alias_thinking": {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "thinking": "via the thinking field"},
    ]},
    "tool_loop": {"tools": [WEATHER_TOOL, SEARCH_TOOL], "messages": [
        {"role": "system", "content": "You help with weather."},
        {"role": "user", "content": "Weather in Paris and Oslo for 3 days?"},
        {"role": "assistant", "content": None, "reasoning_content": "call the tool twice",
         "tool_calls": [_call("get_weather", {"city": "Paris", "days": 3}),
                        _call("get_weather", {"city": "Oslo", "days": 3, "opts": {"u": "C", "x": [1, 2]}},
                              "call_2")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "晴 -3°C"},
        {"role": "assistant", "content": "Paris 21, Oslo -3.", "reasoning_content": "summarise"},
        {"role": "user", "content": "thanks"},
    ]},
    "tool_call_with_text": {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}]},
    ]},
    "content_parts": {"messages": [
        {"role": "system",
         "content": [{"type": "text", "text": "part one. "}, {"type": "text", "text": "two"}]},
        {"role": "user",
         "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": "x"}]},
    ]},
    "empty_assistant": {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "?"},
    ]},
}
KWARGS: list[dict[str, Any]] = [
    {},
    {"enable_thinking": False},
    {"enable_thinking": True, "clear_thinking": False},
    {"clear_thinking": True},
    {"enable_thinking": False, "clear_thinking": False},
]

# A GLM-4.7-flavoured template written for this test: no newlines after roles, "</think>" for an
# empty reasoning, clear_thinking via `is defined`, a {% generation %} block, loop controls,
# namespace, tojson options, raise_exception, strftime_now and the eos_token variable.
GLM47_STYLE = r"""[gMASK]<sop>
{%- if tools -%}<|system|>Tools:{% for t in tools %}
{{ t | tojson(ensure_ascii=False, sort_keys=True) }}{% endfor %}{%- endif -%}
{%- set ns = namespace(last_user=-1, n=0) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>{{ m.content }}
{%- elif m.role == 'assistant' -%}<|assistant|>
{%- generation -%}
{%- set keep = (clear_thinking is defined and not clear_thinking) or loop.index0 > ns.last_user -%}
{%- if keep and m.reasoning_content -%}
<think>{{ m.reasoning_content.strip() }}</think>
{%- else -%}</think>{%- endif -%}
{{ m.content if m.content is string else '' }}
{%- for tc in m.tool_calls or [] -%}
{%- set tc = tc.function if tc.function is defined else tc -%}
<tool_call>{{ tc.name }}{% for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>
{{- v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{% endfor %}</tool_call>
{%- endfor -%}
{%- endgeneration -%}
{%- elif m.role == 'tool' -%}<|observation|><tool_response>{{ m.content }}</tool_response>
{%- elif m.role == 'system' -%}<|system|>{{ m.content }}
{%- else -%}{{ raise_exception('bad role ' ~ m.role) }}
{%- endif -%}
{%- set ns.n = ns.n + 1 -%}
{%- if ns.n > 50 %}{% break %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{{- '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' }}{%- endif -%}
{{- '' if strftime_now('%Y') | length == 4 else 'bad-year' -}}
{%- if eos_token is defined and False %}{{ eos_token }}{% endif -%}
"""


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.getbasetemp() / "pdserve-cache")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir: Path) -> Any:
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))


def _hf_render(hf_tok: Any, case: dict[str, Any], gen: bool, template: str | None = None, **kw: Any) -> str:
    out = hf_tok.apply_chat_template(
        copy.deepcopy(case["messages"]), tools=copy.deepcopy(case.get("tools")), tokenize=False,
        add_generation_prompt=gen, chat_template=template, **kw,
    )
    return str(out)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_matches_transformers_on_glm45_template(case_name: str, tok: Tokenizer, hf_tok: Any) -> None:
    case = CASES[case_name]
    for kwargs in KWARGS:
        for gen in (True, False):
            ours = tok.apply_chat_template(copy.deepcopy(case["messages"]), tools=case.get("tools"),
                                           add_generation_prompt=gen, **kwargs)
            assert ours == _hf_render(hf_tok, case, gen, **kwargs), (case_name, kwargs, gen)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_matches_transformers_on_glm47_style_template(case_name: str, tok: Tokenizer, hf_tok: Any) -> None:
    case = CASES[case_name]
    for kwargs in KWARGS:
        ours = tok.apply_chat_template(copy.deepcopy(case["messages"]), tools=case.get("tools"),
                                       chat_template=GLM47_STYLE, **kwargs)
        assert ours == _hf_render(hf_tok, case, True, GLM47_STYLE, **kwargs), (case_name, kwargs)


def test_glm45_format(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\nU<|assistant|>"
    ids = tok.encode(text)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert ids[-1] == tok.token_to_id("<|assistant|>")


def test_tool_calls_and_results_format(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(copy.deepcopy(CASES["tool_loop"]["messages"]), tools=[WEATHER_TOOL])
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools\n")
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in text
    assert "call the tool twice" not in text  # reasoning before the last user turn is cleared
    assert ("<|assistant|>\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
            "\n<tool_call>get_weather\n") in text
    assert '<arg_value>{"u": "C", "x": [1, 2]}</arg_value>' in text
    # consecutive tool results share one <|observation|>
    assert ("<|observation|>\n<tool_response>\n{\"temp\": 21}\n</tool_response>"
            "\n<tool_response>\n晴 -3°C\n</tool_response><|assistant|>") in text
    assert text.count("<|observation|>") == 1


def test_thinking_switches(tok: Tokenizer) -> None:
    msgs = copy.deepcopy(CASES["tool_loop"]["messages"][:5])  # ends inside the tool loop
    kept = tok.apply_chat_template(msgs)
    assert "<think>call the tool twice</think>" in kept  # current turn's reasoning is always kept
    assert kept.endswith("</tool_response><|assistant|>")
    off = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert off == "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"
    history = copy.deepcopy(CASES["multi_turn_reasoning"]["messages"])
    assert "<think></think>\n4" in tok.apply_chat_template(history)
    assert "<think>add them</think>\n4" in tok.apply_chat_template(history, clear_thinking=False)


def test_string_tool_arguments_are_parsed(tok: Tokenizer) -> None:
    as_obj = copy.deepcopy(CASES["tool_call_with_text"]["messages"])
    as_str = copy.deepcopy(as_obj)
    as_str[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    assert tok.apply_chat_template(as_str) == tok.apply_chat_template(as_obj)
    as_str[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        tok.apply_chat_template(as_str)
    as_str[1]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        tok.apply_chat_template(as_str)


def test_bad_input_raises_invalid_request(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="unsupported message role: wizard"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="at least one message"):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError, match="must be an object"):
        tok.apply_chat_template(["hello"])
    with pytest.raises(InvalidRequestError, match="may not override"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template_kwargs={"messages": []})
    with pytest.raises(InvalidRequestError, match="chat template error"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(InvalidRequestError, match="chat template error"):
        tok.apply_chat_template([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}])
    with pytest.raises(InvalidRequestError, match="boom"):
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template="{{ raise_exception('boom') }}")


def test_sandbox_blocks_escapes(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(msgs, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(msgs, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(InvalidRequestError):  # immutable sandbox: no mutation of inputs
        tok.apply_chat_template(msgs, chat_template="{{ messages.append(1) }}")


def test_pydantic_messages_and_none_fields(tok: Tokenizer) -> None:
    class Msg(BaseModel):
        role: str
        content: str | None = None
        tool_calls: list[dict[str, Any]] | None = None

    objs = [Msg(role="user", content="hi"), Msg(role="assistant", content=None)]
    dicts = [{"role": "user", "content": "hi"}, {"role": "assistant"}]
    assert tok.apply_chat_template(objs) == tok.apply_chat_template(dicts)


def test_continue_final_message(tok: Tokenizer, hf_tok: Any) -> None:
    msgs = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    theirs = hf_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert ours == theirs
    assert ours.endswith("<|assistant|>\n<think></think>\n1, 2,")
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(msgs, add_generation_prompt=True, continue_final_message=True)


def test_renderer_caches_compiled_templates() -> None:
    renderer = ChatTemplateRenderer()
    assert renderer.compile("{{ 1 }}") is renderer.compile("{{ 1 }}")
    out = renderer.render("{{ messages[0].content }}{{ eos_token }}", [{"role": "user", "content": "a"}],
                          special_tokens={"eos_token": "</s>"})
    assert out == "a</s>"
