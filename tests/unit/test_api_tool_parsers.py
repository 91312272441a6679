"""glm45/glm47 tool-call parsers and tool validation/typing."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from pdserve.api.protocol import ToolDef
from pdserve.api.tool_parsers import (
    TOOL_FORMATS,
    ToolCallParser,
    get_tool_format,
    merge_tool_call_deltas,
    parse_tool_calls,
)
from pdserve.api.tools import ToolSet, ToolValidator, convert_value, is_string_schema
from pdserve.errors import ConfigError, InvalidRequestError

pytestmark = pytest.mark.unit

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "zip": {"type": "string"},
                "units": {"enum": ["c", "f"]},
                "opts": {"type": "object"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "exact": {"type": "boolean"},
                "note": {"type": ["string", "null"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def toolset(*tools: dict[str, Any]) -> ToolSet:
    return ToolValidator().validate([ToolDef.model_validate(t) for t in tools])


TOOLS = toolset(WEATHER, SEARCH)


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def glm45(name: str, args: list[tuple[str, str]]) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args)
    return f"<tool_call>{name}\n{body}</tool_call>"


def glm47(name: str, args: list[tuple[str, str]]) -> str:
    return (
        f"<tool_call>{name}"
        + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in args)
        + ("</tool_call>")
    )


CASES: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    # output text, expected content, expected [(name, arguments)]
    ("Just text, no calls.", "Just text, no calls.", []),
    (
        "Let me check.\n" + glm45("get_weather", [("city", "Paris"), ("days", "3")]),
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        glm47("get_weather", [("city", "Paris"), ("days", "3")]),
        "",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        glm45("get_weather", [("city", "Rome")]) + "\n" + glm45("search", [("q", "pizza")]),
        "",
        [("get_weather", {"city": "Rome"}), ("search", {"q": "pizza"})],
    ),
    (
        glm47("search", [("q", "a")]) + glm47("search", [("q", "b")]) + glm47("search", [("q", "c")]),
        "",
        [("search", {"q": "a"}), ("search", {"q": "b"}), ("search", {"q": "c"})],
    ),
    (
        glm45(
            "get_weather",
            [
                ("zip", "02139"),
                ("days", "007x"),
                ("units", "c"),
                ("opts", '{"a": [1, 2]}'),
                ("tags", '["x", "y"]'),
                ("exact", "true"),
                ("note", "null"),
            ],
        ),
        "",
        [
            (
                "get_weather",
                {
                    "zip": "02139",
                    "days": "007x",
                    "units": "c",
                    "opts": {"a": [1, 2]},
                    "tags": ["x", "y"],
                    "exact": True,
                    "note": "null",
                },
            )
        ],
    ),
    (
        glm45("get_weather", [("city", 'say "hi"\\ <b>&\n\ttab'), ("city2", "1.5")]),
        "",
        [("get_weather", {"city": 'say "hi"\\ <b>&\n\ttab', "city2": 1.5})],
    ),
    (
        glm45("search", [("q", "</arg_val> and <arg_value> inside")]),
        "",
        [("search", {"q": "</arg_val> and <arg_value> inside"})],
    ),
    (glm45("search", []), "", [("search", {})]),
    (glm47("search", []), "", [("search", {})]),
    (glm45("unknown_tool", [("x", "42"), ("y", "hello")]), "", [("unknown_tool", {"x": 42, "y": "hello"})]),
    (
        "Before " + glm47("search", [("q", "天气 ✓")]) + "\n\nAfter text.",
        "Before \n\nAfter text.",
        [("search", {"q": "天气 ✓"})],
    ),
    ("a < b and <tool_c is not a call", "a < b and <tool_c is not a call", []),
    (glm45("search", [("q", "x")]) + "<tool_call>trunc", "", [("search", {"q": "x"})]),
    (
        "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>cut off mid val",
        "",
        [("search", {"q": "cut off mid val"})],
    ),
    ("<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>12", "", [("get_weather", {"days": 12})]),
    (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>X</arg_value>\n<arg_key>da",
        "",
        [("get_weather", {"city": "X"})],
    ),
    ("<tool_call>search<arg_key>q</arg_key></tool_call>", "", [("search", {})]),
    ("   \n", "   \n", []),
]


def check_result(content: str, calls: list[dict[str, Any]], exp_content: str, expected: list[Any]) -> None:
    assert content == exp_content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


def stream(
    text: str, chunks: list[str], tools: ToolSet = TOOLS, **kw: Any
) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolCallParser(tools, id_factory=ids(), **kw)
    content, deltas = [], []
    for ch in chunks:
        c, d = parser.feed(ch)
        content.append(c)
        deltas.extend(d)
    c, d = parser.finish()
    content.append(c)
    deltas.extend(d)
    for piece in content:
        for tag in ("<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>", "</arg_value>"):
            assert tag not in piece
    starts = [d for d in deltas if "id" in d]
    assert [d["index"] for d in starts] == list(range(len(starts)))  # each call announced once, in order
    for d in starts:
        assert d["type"] == "function" and d["function"]["arguments"] == "" and d["function"]["name"]
    for d in deltas:
        if "id" not in d:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
    return "".join(content), merge_tool_call_deltas(deltas)


@pytest.mark.parametrize(("text", "content", "expected"), CASES)
def test_non_streaming(text: str, content: str, expected: list[Any]) -> None:
    got_content, calls = parse_tool_calls(text, TOOLS)
    check_result(got_content, calls, content, expected)


@pytest.mark.parametrize(("text", "content", "expected"), CASES)
def test_every_split_point_and_char_by_char(text: str, content: str, expected: list[Any]) -> None:
    reference = parse_tool_calls(text, TOOLS, id_factory=ids())
    for cut in range(len(text) + 1):
        assert stream(text, [text[:cut], text[cut:]]) == reference, cut
    got = stream(text, list(text))
    assert got == reference
    check_result(*got, content, expected)


@pytest.mark.parametrize(("text", "content", "expected"), CASES)
def test_random_chunkings(text: str, content: str, expected: list[Any]) -> None:
    rng = random.Random(99)
    reference = parse_tool_calls(text, TOOLS, id_factory=ids())
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, max(2, len(text))), k=min(len(text) - 1, rng.randint(1, 12))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(text, chunks) == reference


def test_string_arguments_stream_incrementally() -> None:
    parser = ToolCallParser(TOOLS, id_factory=ids())
    content, deltas = parser.feed("<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>hello")
    assert content == ""
    assert deltas[0] == {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "search", "arguments": ""},
    }
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"q":"hello'}}
    assert parser.feed(" wor")[1] == [{"index": 0, "function": {"arguments": " wor"}}]
    assert parser.feed("ld</arg_val")[1] == [{"index": 0, "function": {"arguments": "ld"}}]
    assert parser.feed("ue>\n</tool_call>")[1] == [{"index": 0, "function": {"arguments": '"}'}}]
    assert parser.has_calls and parser.num_calls == 1


def test_parallel_tool_calls_false_reports_only_the_first() -> None:
    text = glm45("search", [("q", "a")]) + glm45("search", [("q", "b")]) + "tail"
    content, calls = parse_tool_calls(text, TOOLS, parallel_tool_calls=False)
    assert content == "tail"
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "a"}]


@pytest.mark.parametrize("fmt", ["glm45", "glm47"])
def test_forced_required_starts_inside_a_call(fmt: str) -> None:
    writer = glm45 if fmt == "glm45" else glm47
    output = writer("search", [("q", "x")])[len("<tool_call>") :]
    for chunks in ([output], list(output)):
        content, calls = stream(output, chunks, start="name")
        check_result(content, calls, "", [("search", {"q": "x"})])


@pytest.mark.parametrize("fmt", ["glm45", "glm47"])
def test_forced_named_starts_inside_the_arguments(fmt: str) -> None:
    prefix = get_tool_format(fmt).forced_prefix("get_weather")
    full = (glm45 if fmt == "glm45" else glm47)("get_weather", [("city", "Oslo"), ("days", "2")])
    output = ("\n" + full if fmt == "glm45" else full)[len(prefix) :]
    for chunks in ([output], list(output), []):
        content, calls = stream(output, chunks, start="args", forced_name="get_weather")
        expected = {"city": "Oslo", "days": 2} if chunks else {}
        check_result(content, calls, "", [("get_weather", expected)])


def test_formats() -> None:
    assert TOOL_FORMATS["glm45"].forced_prefix(None) == "\n<tool_call>"
    assert TOOL_FORMATS["glm45"].forced_prefix("f") == "\n<tool_call>f\n"
    assert TOOL_FORMATS["glm47"].forced_prefix("f") == "<tool_call>f"
    with pytest.raises(ConfigError):
        get_tool_format("nope")
    with pytest.raises(ConfigError):
        ToolCallParser(TOOLS, start="args")


# ------------------------------------------------------------------------------ tool validation


@pytest.mark.parametrize(
    ("tool", "fragment"),
    [
        ({"type": "function", "function": {"name": "bad name"}}, "invalid tool name"),
        ({"type": "function", "function": {"name": "x" * 65}}, "invalid tool name"),
        ({"type": "function", "function": {"name": ""}}, "invalid tool name"),
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}, "type 'object'"),
        (
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                },
            },
            "invalid JSON Schema",
        ),
        (
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "required": "a"}},
            },
            "invalid JSON Schema",
        ),
    ],
)
def test_invalid_tools_are_400_with_the_reason(tool: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        toolset(tool)
    assert fragment in info.value.message
    assert info.value.http_status == 400
    assert str(info.value.details["param"]).startswith("tools[0].function.")


def test_duplicate_tool_names_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="duplicate"):
        toolset(SEARCH, SEARCH)


def test_schema_verdicts_are_cached_and_bounded() -> None:
    validator = ToolValidator(cache_size=2)
    for i in range(5):
        tool = {
            "type": "function",
            "function": {
                "name": f"t{i}",
                "parameters": {"type": "object", "properties": {f"p{i}": {"type": "string"}}},
            },
        }
        ts = validator.validate([ToolDef.model_validate(tool)])
        assert ts.is_string_param(f"t{i}", f"p{i}")
    assert len(validator._cache) == 2


def test_missing_parameters_default_to_empty_object() -> None:
    ts = toolset({"type": "function", "function": {"name": "ping", "description": "d"}})
    assert ts.template_tools() == [
        {
            "type": "function",
            "function": {
                "name": "ping",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, True),
        ({"type": ["string", "null"]}, True),
        ({"type": ["string", "integer"]}, False),
        ({"enum": ["a", "b"]}, True),
        ({"enum": ["a", 1]}, False),
        ({"const": "x"}, True),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, True),
        ({"anyOf": [{"type": "string"}, {"type": "number"}]}, False),
        ({"type": "integer"}, False),
        ({}, False),
        ("string", False),
    ],
)
def test_is_string_schema(schema: Any, expected: bool) -> None:
    assert is_string_schema(schema) is expected


@pytest.mark.parametrize(
    ("raw", "as_string", "expected"),
    [
        ("42", True, "42"),
        ("42", False, 42),
        (" 4.5 ", False, 4.5),
        ("abc", False, "abc"),
        ("", False, ""),
        ("[1, 2]", False, [1, 2]),
        ("NaN", False, "NaN"),
        ('"quoted"', False, "quoted"),
        ("true", True, "true"),
    ],
)
def test_convert_value(raw: str, as_string: bool, expected: Any) -> None:
    assert convert_value(raw, as_string) == expected
