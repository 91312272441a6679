"""RouterConfig: every knob of the router, validated once (pydantic v2, ``extra="forbid"``).

Loaded from YAML (``RouterConfig.from_yaml``), then overridden by CLI flags (router/cli.py).
A section per concern; each default is the production default, tests shrink the timeouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdserve.errors import ConfigError

WorkerRole = Literal["prefill", "decode", "both"]
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default


def normalize_url(url: str) -> str:
    """``http://host:port`` (no trailing slash, no path); raises ConfigError otherwise."""
    raw = url.strip().rstrip("/")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme != "http":
        raise ConfigError(f"worker url {url!r}: only http:// is supported", param="url")
    if not parts.hostname:
        raise ConfigError(f"worker url {url!r} has no host", param="url")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"worker url {url!r} has an invalid port", param="url") from exc
    if port is None:
        raise ConfigError(f"worker url {url!r} must name a port", param="url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"worker url {url!r} must not carry a path or query", param="url")
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerSpec(_Section):
    url: str
    role: WorkerRole
    bootstrap_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            return normalize_url(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="before")
    @classmethod
    def _bootstrap(cls, data: Any) -> Any:
        if isinstance(data, dict):
            role, port = data.get("role"), data.get("bootstrap_port")
            if role == "prefill" and port is None:
                return {**data, "bootstrap_port": DEFAULT_BOOTSTRAP_PORT}
            if role in ("decode", "both") and port is not None:
                raise ValueError(f"bootstrap_port is only meaningful for prefill workers, not {role}")
        return data


class PolicyConfig(_Section):
    """How a prefill and a decode worker are chosen (see router/policy.py)."""

    prefill: Literal["cache_aware", "load", "round_robin", "random"] = "cache_aware"
    decode: Literal["load", "round_robin", "random"] = "load"
    # Candidates whose cost is within best * (1 + tie_rel) + tie_abs are near-ties: two of them
    # are drawn at random and the less loaded one wins (power of two choices).
    prefill_tie_rel: float = Field(default=0.1, ge=0.0, le=10.0)
    prefill_tie_abs_tokens: int = Field(default=32, ge=0)
    decode_tie_abs: float = Field(default=1.0, ge=0.0)
    # Decode cost = running requests + kv_weight * (1 - free KV fraction).
    decode_kv_weight: float = Field(default=16.0, ge=0.0)
    # Prefix index: token ids are hashed in blocks (a block is cached only when full, as in the
    # workers' paged KV cache); each worker's index keeps at most this many blocks (LRU).
    block_size: int = Field(default=16, ge=1, le=4096)
    index_max_blocks: int = Field(default=200_000, ge=16)
    # Conditional disaggregation: a prompt whose uncached part (judged by the decode worker's
    # prefix index) is shorter than this many tokens prefills on the decode worker itself.
    # 0 disables it (every prompt is prefilled remotely, as SGLang's routers do).
    local_prefill_threshold: int = Field(default=0, ge=0)


class HealthConfig(_Section):
    enabled: bool = True
    endpoint: str = "/health"
    interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=2, ge=1)


class LoadConfig(_Section):
    enabled: bool = True
    endpoint: str = "/get_load"
    interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    stale_after_s: float = Field(default=10.0, gt=0)


class BreakerConfig(_Section):
    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1)
    success_threshold: int = Field(default=2, ge=1)
    open_timeout_s: float = Field(default=10.0, gt=0)
    window_s: float = Field(default=60.0, gt=0)
    half_open_max_trials: int = Field(default=1, ge=1)


class RetryConfig(_Section):
    max_retries: int = Field(default=2, ge=0, le=20)
    statuses: tuple[int, ...] = (408, 429, 500, 502, 503, 504)
    backoff_initial_s: float = Field(default=0.02, ge=0)
    backoff_max_s: float = Field(default=1.0, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1.0)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)


class TimeoutConfig(_Section):
    connect_s: float = Field(default=3.0, gt=0)
    # Longest silence tolerated while waiting for response bytes (a non-streamed response is
    # silent for the whole generation, so this also bounds one non-streamed request).
    read_s: float = Field(default=600.0, gt=0)
    # After the decode leg finished, how long a still-running prefill leg may take to drain.
    prefill_drain_s: float = Field(default=5.0, gt=0)
    pool_idle_s: float = Field(default=30.0, gt=0)
    pool_max_idle_per_worker: int = Field(default=256, ge=0)


class RouterConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: tuple[WorkerSpec, ...] = ()
    model_path: str | None = None  # local model dir: tokenizer + chat template
    served_model_name: str | None = None
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_inflight_requests: int | None = Field(default=None, ge=1)  # 429 beyond it
    # Answer native /generate with ``x-pdserve-route: <mode> prefill=<url> target=<url>``
    # (debugging aid; turn off to keep worker addresses away from clients).
    route_header: bool = True
    policy: PolicyConfig = PolicyConfig()
    health: HealthConfig = HealthConfig()
    load: LoadConfig = LoadConfig()
    breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    # Extra sampling/validation limits the OpenAI layer enforces.
    max_model_len: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _unique_workers(self) -> RouterConfig:
        seen: set[str] = set()
        for w in self.workers:
            if w.url in seen:
                raise ValueError(f"worker {w.url} is listed twice")
            seen.add(w.url)
        return self

    @classmethod
    def build(cls, **data: Any) -> RouterConfig:
        """Construct, mapping pydantic's ValidationError to ConfigError (one readable line)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid router config: {_summarize(exc)}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RouterConfig:
        """Read a YAML mapping (optionally under a top-level ``router:`` key) and apply overrides."""
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read router config {p}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"router config {p} is not valid YAML: {exc}") from exc
        data: Any = {} if loaded is None else loaded
        if isinstance(data, dict) and set(data) == {"router"}:
            data = data["router"]
        if not isinstance(data, dict):
            raise ConfigError(f"router config {p} must be a mapping")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.build(**merged)


def _summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
