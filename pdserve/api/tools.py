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
        self._schema_ok: OrderedDict[bytes, str | None] = OrderedDict()

    def validate(self, tools: Sequence[ToolDef]) -> ToolSet:
        out: list[dict[str, Any]] = []
        string_params: dict[str, frozenset[str]] = {}
        for i, tool in enumerate(tools):
            fn = tool.function
            param = f"tools[{i}].function.name"
            if not TOOL_NAME_RE.match(fn.name):
                raise InvalidRequestError(
                    f"invalid tool name {fn.name!r}: must match [a-zA-Z0-9_-] and be 1 to 64 characters",
                    param=param,
                )
            if fn.name in string_params:
                raise InvalidRequestError(f"duplicate tool name {fn.name!r}", param=param)
            schema = fn.parameters if fn.parameters is not None else _EMPTY_OBJECT_SCHEMA
            self._check_schema(fn.name, schema, f"tools[{i}].function.parameters")
            props = schema.get("properties")
            props = props if isinstance(props, Mapping) else {}
            string_params[fn.name] = frozenset(k for k, v in props.items() if is_string_schema(v))
            function: dict[str, Any] = {"name": fn.name}
            if fn.description is not None:
                function["description"] = fn.description
            function["parameters"] = schema
            out.append({"type": "function", "function": function})
        return ToolSet(tools=tuple(out), string_params=string_params)

    def _check_schema(self, name: str, schema: dict[str, Any], param: str) -> None:
        try:
            key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise InvalidRequestError(
                f"parameters of tool {name!r} are not JSON: {exc}", param=param
            ) from exc
        if key in self._schema_ok:
            self._schema_ok.move_to_end(key)
            error = self._schema_ok[key]
        else:
            error = self._schema_error(schema)
            self._schema_ok[key] = error
            if len(self._schema_ok) > self._cache_size:
                self._schema_ok.popitem(last=False)
        if error is not None:
            raise InvalidRequestError(f"invalid JSON Schema for tool {name!r}: {error}", param=param)

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
