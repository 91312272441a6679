"""Tool definitions of a chat request: validation and argument typing.

A tool is ``{"type": "function", "function": {"name", "description", "parameters"}}``. Names must
match ``[a-zA-Z0-9_-]{1,64}`` and be unique; ``parameters`` must be a valid JSON Schema (checked
against its meta-schema with ``jsonschema``) of ``type: object``. Agents resend the same tools with
every request, so verdicts on schemas are cached per :class:`ToolValidator` instance (bounded LRU).

Argument typing (used by the tool-call parsers): a parameter whose schema only admits strings is
kept as the raw text the model wrote; any other value is ``json.loads``-ed when it parses and kept
as a raw string otherwise.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from pdserve.api.protocol import ToolDef
from pdserve.errors import InvalidRequestError

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def is_string_schema(schema: Any) -> bool:
    """True when ``schema`` admits strings and nothing else (``null`` aside)."""
    if not isinstance(schema, Mapping):
        return False
    t = schema.get("type")
    if t == "string":
        return True
    if isinstance(t, list):
        kinds = {k for k in t if k != "null"}
        return kinds == {"string"}
    if t is None:
        if "enum" in schema:
            values = [v for v in schema["enum"] if v is not None]
            return bool(values) and all(isinstance(v, str) for v in values)
        if "const" in schema:
            return isinstance(schema["const"], str)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
                return bool(non_null) and all(is_string_schema(o) for o in non_null)
    return False


@dataclass(frozen=True, slots=True)
class ToolSet:
    """The validated tools of one request. ``string_params[name]`` are the raw-string parameters."""

    tools: tuple[dict[str, Any], ...]
    string_params: Mapping[str, frozenset[str]]

    @property
    def names(self) -> list[str]:
        return list(self.string_params)

    def __contains__(self, name: object) -> bool:
        return name in self.string_params

    def is_string_param(self, tool_name: str, key: str) -> bool:
        params = self.string_params.get(tool_name)
        return params is not None and key in params

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template expects them (OpenAI shape, parameters filled in)."""
        return [dict(t) for t in self.tools]


EMPTY_TOOLSET = ToolSet(tools=(), string_params={})


def convert_value(raw: str, as_string: bool) -> Any:
    """Type one argument value: raw text for string parameters, JSON when it parses otherwise."""
    if as_string:
        return raw
    stripped = raw.strip()
    if not stripped:
        return raw
    try:
        return orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return raw


class ToolValidator:
    """Validates request tools; remembers verdicts on up to ``cache_size`` distinct schemas."""

    def __init__(self, cache_size: int = 1024) -> None:
        self._cache_size = cache_size
        # definition -> (template tool, string params) or the schema error message
        self._cache: OrderedDict[bytes, tuple[dict[str, Any], frozenset[str]] | str] = OrderedDict()

    def validate(self, tools: Sequence[ToolDef]) -> ToolSet:
        out: list[dict[str, Any]] = []
        string_params: dict[str, frozenset[str]] = {}
        for i, tool in enumerate(tools):
            fn = tool.function
            if fn.name in string_params:
                param = f"tools[{i}].function.name"
                raise InvalidRequestError(f"duplicate tool name {fn.name!r}", param=param)
            template_tool, strings = self._validate_one(fn.name, fn.description, fn.parameters, i)
            out.append(template_tool)
            string_params[fn.name] = strings
        return ToolSet(tools=tuple(out), string_params=string_params)

    def _validate_one(
        self, name: str, description: str | None, parameters: dict[str, Any] | None, i: int
    ) -> tuple[dict[str, Any], frozenset[str]]:
        """One tool -> (its template dict, its string parameters); verdicts cached per definition."""
        if not TOOL_NAME_RE.match(name):
            raise InvalidRequestError(
                f"invalid tool name {name!r}: must match [a-zA-Z0-9_-] and be 1 to 64 characters",
                param=f"tools[{i}].function.name",
            )
        schema = parameters if parameters is not None else _EMPTY_OBJECT_SCHEMA
        param = f"tools[{i}].function.parameters"
        try:
            key = orjson.dumps([name, description, schema], option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            msg = f"parameters of tool {name!r} are not JSON: {exc}"
            raise InvalidRequestError(msg, param=param) from exc
        cached = self._cache.get(key)
        if cached is None:
            error = self._schema_error(schema)
            if error is None:
                props = schema.get("properties")
                props = props if isinstance(props, Mapping) else {}
                function: dict[str, Any] = {"name": name}
                if description is not None:
                    function["description"] = description
                function["parameters"] = schema
                strings = frozenset(k for k, v in props.items() if is_string_schema(v))
                cached = ({"type": "function", "function": function}, strings)
            else:
                cached = error
            self._cache[key] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(cached, str):
            raise InvalidRequestError(f"invalid JSON Schema for tool {name!r}: {cached}", param=param)
        return cached

    @staticmethod
    def _schema_error(schema: dict[str, Any]) -> str | None:
        if schema.get("type") != "object":
            return f"schema must be of type 'object', got type {schema.get('type')!r}"
        try:
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            return f"{exc.message}" + (f" (at {where})" if where else "")
        props = schema.get("properties")
        if props is not None and not isinstance(props, Mapping):
            return "'properties' must be an object"
        return None
