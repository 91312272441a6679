"""``WorkerConfig``: everything one worker process needs (prefill, decode or colocated ``both``).

The engine and KV-transfer sections are the components' own classes (``EngineConfig``,
``TransferConfig``); this module adds the worker's role, addresses, served model name and the
limits/timeouts of its HTTP front. ``model`` (or ``engine.model``) None means the embedded tiny
default model, resolved by :meth:`WorkerConfig.resolved` (which builds it on first use).

Build from untrusted input with :meth:`WorkerConfig.build` (pydantic errors become one
:class:`~pdserve.errors.ConfigError` naming the field); constructors never read the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.engine.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.kvtransfer.config import TransferConfig

WorkerRole = Literal["prefill", "decode", "both"]
ROLES: tuple[str, ...] = ("prefill", "decode", "both")
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default disaggregation bootstrap port


class WorkerLimits(BaseModel):
    """Request limits and the bounded waits of the HTTP front (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(16 << 20, ge=1024, description="largest accepted request body")
    default_max_tokens: int = Field(
        128, ge=1, description="native /generate without max_new_tokens (OpenAI: up to the context)"
    )
    first_output_timeout_s: float = Field(
        120.0, gt=0, description="queueing + prefill (+ KV transfer) until the first output"
    )
    output_timeout_s: float = Field(60.0, gt=0, description="between two outputs of one request")
    request_timeout_s: float | None = Field(None, gt=0, description="whole request; None = unbounded")
    close_timeout_s: float = Field(5.0, gt=0, description="closing a backend stream")
    reserve_wait_s: float = Field(
        10.0, ge=0, description="decode: how long a PD request waits for free KV pages before 503"
    )
    disconnect_poll_s: float = Field(
        0.2, gt=0, le=5.0, description="how often a waiting request checks for a client disconnect"
    )
    engine_call_timeout_s: float = Field(30.0, gt=0, description="one command to the engine thread")
    health_generate_timeout_s: float = Field(20.0, gt=0, description="/health_generate's 1-token run")
    shutdown_timeout_s: float = Field(10.0, gt=0, description="stopping the engine thread")


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: WorkerRole = "both"
    host: str = Field("127.0.0.1", min_length=1, description="HTTP (and bootstrap/data) bind address")
    port: int = Field(30000, ge=0, le=65535, description="HTTP port")
    bootstrap_port: int = Field(
        DEFAULT_BOOTSTRAP_PORT,
        ge=0,
        le=65535,
        description="prefill: the KV bootstrap endpoint's port (0 = pick one); decode: the peer port "
        "used when a request's bootstrap_port is null",
    )
    served_model_name: str | None = Field(None, min_length=1, description="None = the model dir's name")
    model: str | None = Field(None, description="checkpoint dir; None = engine.model or the default model")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig.model_validate({}))
    kvtransfer: TransferConfig = Field(default_factory=lambda: TransferConfig.model_validate({}))
    limits: WorkerLimits = Field(default_factory=lambda: WorkerLimits.model_validate({}))
    reasoning_parser: str | None = "glm45"
    tool_parser: str | None = "glm45"
    incremental_streaming_output: bool = Field(
        False, description="native /generate streams deltas instead of SGLang's cumulative chunks"
    )

    @model_validator(mode="after")
    def _check(self) -> WorkerConfig:
        if self.model is not None and self.engine.model is not None and self.model != self.engine.model:
            raise ValueError(
                f"model ({self.model!r}) and engine.model ({self.engine.model!r}) disagree; set one"
            )
        if self.role == "decode" and self.bootstrap_port == 0:
            raise ValueError("bootstrap_port: a decode worker's default peer port cannot be 0")
        if (
            self.role != "both"
            and self.kvtransfer.transport == "nccl"
            and not self.engine.device.startswith("cuda")
        ):
            raise ValueError(
                "kvtransfer.transport: 'nccl' needs a CUDA engine, "
                f"but engine.device is {self.engine.device!r}"
            )
        if self.role != "both" and self.kvtransfer.device != self.engine.device:
            raise ValueError(
                f"kvtransfer.device ({self.kvtransfer.device!r}) must equal engine.device "
                f"({self.engine.device!r}): the transfer moves the engine's own KV pages"
            )
        return self

    @classmethod
    def build(cls, **fields: Any) -> WorkerConfig:
        """Construct from keyword values, raising :class:`ConfigError` (never pydantic's error)."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            lines = []
            first = ""
            for err in exc.errors(include_url=False):
                loc = ".".join(str(p) for p in err["loc"]) or "worker"
                first = first or loc
                lines.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
            raise ConfigError("invalid worker config: " + "; ".join(lines), param=first) from None

    @property
    def model_path(self) -> str | None:
        return self.model if self.model is not None else self.engine.model

    def resolved(self) -> WorkerConfig:
        """This config with the model directory made concrete (building the default model if
        needed) and ``served_model_name`` filled in. Raises ConfigError for a missing dir."""
        path = self.model_path
        if path is None:
            from pdserve.engine.default_model import ensure_default_model

            model_dir = ensure_default_model()
        else:
            model_dir = Path(path).expanduser()
            if not model_dir.is_dir():
                raise ConfigError(f"model directory {str(model_dir)!r} does not exist", param="model")
        model_dir = model_dir.resolve()
        engine = self.engine.model_copy(update={"model": str(model_dir)})
        name = self.served_model_name or model_dir.name
        return self.model_copy(update={"model": str(model_dir), "engine": engine, "served_model_name": name})
