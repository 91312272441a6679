"""The whole pdserve config: one section per component, loaded from YAML plus env overrides.

Composition: :class:`PdserveConfig` has one field per component section, each section class
owned by its component (``fleet: pdserve.deploy.config.FleetConfig``, ...). Loading:

1. read the YAML file (none = all defaults); the top level must be a mapping of sections;
2. apply ``PDSERVE_<SECTION>__<FIELD>[__<SUBFIELD>...]=value`` environment overrides once, here
   (values are parsed as YAML scalars/flow collections: ``2``, ``true``, ``[a, b]``, ``{k: 1}``);
3. validate with pydantic; every problem becomes one line ``<field.path>: <what is wrong>``,
   all joined into a single :class:`~pdserve.errors.ConfigError` that also names the source.

Constructors never read the environment; only :func:`load_config` does, and only when asked.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.deploy.config import ROLES, FleetConfig
from pdserve.engine.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.kvtransfer.config import TransferConfig
from pdserve.router.config import RouterConfig

_PATH_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
ENV_PREFIX = "PDSERVE_"
ENV_SEP = "__"


class PdserveConfig(BaseModel):
    """The composed config. Sections not given take their defaults: together, 1 prefill + 1 decode
    worker and the router on 127.0.0.1:8000 serving the tiny default model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model_validate({}): the sections' defaults (keeps mypy's view of the constructors honest).
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig.model_validate({}))
    kvtransfer: TransferConfig = Field(default_factory=lambda: TransferConfig.model_validate({}))
    router: RouterConfig = Field(default_factory=lambda: RouterConfig.model_validate({}))
    fleet: FleetConfig = FleetConfig()

    @property
    def uses_gpu(self) -> bool:
        return self.engine.device.startswith("cuda")

    @model_validator(mode="after")
    def _cross_section(self) -> PdserveConfig:
        # Messages start with the full field path (see _relocate).
        for role in ROLES:
            group = self.fleet.group(role)
            if group.tp_size > 1 and not self.uses_gpu:
                raise ValueError(
                    f"fleet.{role}.tp_size: {group.tp_size} tensor-parallel ranks need GPUs, but "
                    f"engine.device is {self.engine.device!r} (use engine.device: cuda or tp_size: 1)"
                )
            if group.port and group.port == self.router.port:
                raise ValueError(f"fleet.{role}.port: {group.port} is also router.port")
        if self.kvtransfer.transport == "nccl" and not self.uses_gpu:
            raise ValueError(
                "kvtransfer.transport: 'nccl' needs CUDA workers, "
                f"but engine.device is {self.engine.device!r}"
            )
        return self


def section_names() -> tuple[str, ...]:
    return tuple(PdserveConfig.model_fields)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> PdserveConfig:
    """Load ``path`` (YAML; ``None`` = defaults) and apply ``env`` overrides (pass ``os.environ``
    to honour the process environment; ``None`` applies none)."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    env_paths: dict[tuple[str, ...], str] = {}
    if env is not None:
        env_paths = apply_env_overrides(data, env)
    return parse_config(data, source=source, env_paths=env_paths)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist or is not a file", param="config")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(p)!r} must be a mapping of sections ({', '.join(section_names())}), "
            f"got {type(loaded).__name__}"
        )
    return loaded


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge ``PDSERVE_<SECTION>__<FIELD>...`` variables into ``data`` in place. Returns the field
    paths set, mapped to the variable that set them (for error messages)."""
    applied: dict[tuple[str, ...], str] = {}
    sections = section_names()
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_SEP not in name:
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_SEP))
        if any(not p for p in parts) or len(parts) < 2:
            raise ConfigError(f"environment variable {name}: empty path segment", param=name)
        if parts[0] not in sections:
            raise ConfigError(
                f"environment variable {name}: unknown section {parts[0]!r} "
                f"(sections: {', '.join(sections)})",
                param=name,
            )
        node: dict[str, Any] = data
        for i, key in enumerate(parts[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise ConfigError(f"environment variable {name}: {dotted} is not a mapping", param=name)
            node = child
        node[parts[-1]] = _parse_env_value(name, env[name])
        applied[parts] = name
    return applied


def _parse_env_value(name: str, raw: str) -> Any:
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        # Not a YAML scalar/collection (e.g. "a: b: c"): take it as the literal string.
        return raw


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    env_paths: Mapping[tuple[str, ...], str] | None = None,
) -> PdserveConfig:
    """Validate a mapping of sections, raising one :class:`ConfigError` naming each bad field."""
    try:
        return PdserveConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, source=source, env_paths=env_paths or {}) from None


def config_error(
    exc: ValidationError, *, source: str, env_paths: Mapping[tuple[str, ...], str]
) -> ConfigError:
    lines: list[str] = []
    first_path = ""
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        loc, text = _relocate(loc, _describe(err, loc))
        path = ".".join(loc) or "<config>"
        first_path = first_path or path
        lines.append(f"{path}: {text}{_from_env(loc, env_paths)}")
    message = f"invalid config ({source}): " + "; ".join(lines)
    return ConfigError(message, param=first_path, source=source)


def _describe(err: Mapping[str, Any], loc: tuple[str, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = ""
        if allowed:
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            hint += f"; allowed keys: {', '.join(allowed)}"
        return f"unknown key{hint}"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind != "missing" and "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    return msg


def _relocate(loc: tuple[str, ...], text: str) -> tuple[tuple[str, ...], str]:
    """A validator message may begin with the path of the field it is about, relative to the
    model that raised it (``"decode.replicas: ..."``); move that path into the location."""
    head, sep, rest = text.partition(": ")
    if not sep or not _PATH_RE.match(head):
        return loc, text
    parts = tuple(head.split("."))
    if parts[0] not in _allowed_keys(loc):
        return loc, text
    return loc + parts, rest


def _from_env(loc: tuple[str, ...], env_paths: Mapping[tuple[str, ...], str]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in env_paths:
            return f" [from {env_paths[loc[:n]]}]"
    return ""


def _allowed_keys(parent: tuple[str, ...]) -> list[str]:
    """The field names of the model at ``parent`` (a pydantic loc), if it resolves to one."""
    model: type[BaseModel] | None = PdserveConfig
    for key in parent:
        if model is None or key not in model.model_fields:
            return []
        model = _model_of(model.model_fields[key].annotation)
    return sorted(model.model_fields) if model is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(config: PdserveConfig) -> str:
    """The config as YAML (round-trips through :func:`load_config`)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
