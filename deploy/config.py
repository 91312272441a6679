"""The fleet section of the pdserve config: how many workers, where they run, how they start.

A fleet is one router plus ``prefill.replicas`` prefill workers and ``decode.replicas`` decode
workers, each worker a Ray actor that serves HTTP on its own port. Every worker gets its own
placement group of one bundle (``CPU: num_cpus``, ``GPU: tp_size`` on CUDA, plus any custom
``resources``), named by role, so prefill and decode capacity are reserved separately and a
worker's own child processes (TP ranks) are captured in its bundle.

Validation raises pydantic errors that :func:`pdserve.config.load_config` turns into one
``ConfigError`` line naming the field path (``fleet.decode.tp_size: ...``). Checks that need the
cluster (does a bundle fit on any node?) happen in :mod:`pdserve.deploy.placement`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES: tuple[str, ...] = ("prefill", "decode")
_RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
_IMPORT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
DEFAULT_WORKER_APP = "pdserve.deploy.apps:build_worker_app"
DEFAULT_ROUTER_APP = "pdserve.deploy.apps:build_router_app"


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in _RESERVED_RESOURCES:
            raise ValueError(f"{name!r} is set by num_cpus/tp_size/memory_gb, not by resources")
        if not name or amount <= 0:
            raise ValueError(f"resource {name!r} must have a positive amount, got {amount}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AppConfig(_Strict):
    """An ASGI app factory, ``"module:function"``, called in the actor as
    ``factory(host=, port=, role=, [bootstrap_port=,] config=, **kwargs)`` where ``config`` is the
    whole pdserve config as a JSON-able dict and ``bootstrap_port`` is given to prefill workers."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _import_string(cls, value: str) -> str:
        if not _IMPORT_RE.match(value):
            raise ValueError(f"must look like 'package.module:function', got {value!r}")
        return value

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted({"host", "port", "bootstrap_port", "role", "config"} & set(value))
        if clash:
            raise ValueError(f"{clash} are set by the fleet, not by kwargs")
        return value


class WorkerGroupConfig(_Strict):
    """One role's workers. Resources are per worker (one placement-group bundle each); a worker
    reserves ``tp_size`` GPUs when the engine runs on CUDA (``engine.device``)."""

    replicas: int = Field(default=1, ge=0, le=512)
    tp_size: int = Field(default=1, ge=1, le=64, description="tensor-parallel ranks (GPUs) per worker")
    num_cpus: float = Field(default=1.0, ge=0.0, le=1024.0, description="logical Ray CPUs per worker")
    memory_gb: float | None = Field(default=None, gt=0.0, description="Ray memory reservation per worker")
    resources: dict[str, float] = Field(
        default_factory=dict, description="extra custom Ray resources per worker (node-type markers)"
    )
    port: int = Field(default=0, ge=0, le=65535, description="HTTP port; 0 picks a free one per worker")
    bootstrap_port: int = Field(
        default=0, ge=0, le=65535, description="prefill KV bootstrap port; 0 picks a free one per worker"
    )
    max_restarts: int = Field(default=-1, ge=-1, description="Ray actor restarts; -1 = forever")
    app: AppConfig | None = Field(default=None, description="override the fleet's worker app for this role")

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value)

    def bundle(self, *, gpu: bool) -> dict[str, float]:
        """The placement-group bundle one worker of this group reserves (``gpu``: CUDA engine)."""
        out: dict[str, float] = {"CPU": self.num_cpus}
        if gpu:
            out["GPU"] = float(self.tp_size)
        if self.memory_gb is not None:
            out["memory"] = self.memory_gb * 1024**3
        out.update(self.resources)
        return {k: v for k, v in out.items() if v > 0}


class RouterDeployConfig(_Strict):
    """How the router actor runs (its serving options, host and port live in ``router:``)."""

    num_cpus: float = Field(default=1.0, ge=0.0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources, e.g. {'node:__internal_head__': 0.01}"
    )
    max_restarts: int = Field(default=-1, ge=-1)
    app: AppConfig | None = None

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value)


class FleetTimeouts(_Strict):
    """Every wait of the fleet, in seconds."""

    startup_s: float = Field(default=600.0, gt=0, description="a worker must be serving within this")
    placement_s: float = Field(default=120.0, gt=0, description="a placement group must be ready in this")
    health_interval_s: float = Field(default=1.0, gt=0, le=60)
    health_timeout_s: float = Field(default=2.0, gt=0, le=60)
    unhealthy_after: int = Field(default=3, ge=1, le=100, description="failed probes before deregistering")
    drain_s: float = Field(default=120.0, ge=0, description="removal waits this long for in-flight work")
    drain_grace_s: float = Field(default=0.5, ge=0, le=30, description="pause after deregistering")
    shutdown_s: float = Field(default=15.0, gt=0, description="graceful server stop per actor")
    rpc_s: float = Field(default=10.0, gt=0, description="one call to an actor")


class RayConfig(_Strict):
    """The Ray cluster: an address to join, or settings of the embedded local one."""

    address: str | None = Field(default=None, description="join this cluster ('auto' after `ray up`)")
    namespace: str = Field(default="pdserve", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    num_cpus: int | None = Field(default=None, ge=1, description="logical CPUs of the local cluster")
    num_gpus: int | None = Field(default=None, ge=0)
    object_store_mb: int = Field(default=256, ge=80, description="object store of the local cluster")
    temp_dir: str | None = Field(default=None, description="Ray's temp/log dir for the local cluster")
    start_timeout_s: float = Field(default=120.0, gt=0)
    log_to_driver: bool = False


class FleetConfig(_Strict):
    """The ``fleet:`` section. With every section at its defaults the fleet is 1 prefill + 1 decode
    worker + the router on 127.0.0.1:8000 (``router:``) serving the tiny default model (``engine:``)."""

    name: str = Field(default="pdserve", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    worker_host: str = Field(default="127.0.0.1", description="interface the workers bind")
    prefill: WorkerGroupConfig = WorkerGroupConfig()
    decode: WorkerGroupConfig = WorkerGroupConfig()
    router: RouterDeployConfig = RouterDeployConfig()
    worker_app: AppConfig = Field(default_factory=lambda: AppConfig(factory=DEFAULT_WORKER_APP))
    router_app: AppConfig = Field(default_factory=lambda: AppConfig(factory=DEFAULT_ROUTER_APP))
    timeouts: FleetTimeouts = FleetTimeouts()
    ray: RayConfig = RayConfig()
    metrics_port: int = Field(default=0, ge=0, le=65535, description="controller /metrics; 0 = a free port")
    prometheus_sd_file: str | None = Field(
        default=None, description="write Prometheus file_sd targets (router, workers, controller) here"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        # Messages start with the field path relative to this section (see pdserve.config).
        for role, other in (("prefill", "decode"), ("decode", "prefill")):
            if self.group(role).replicas == 0:
                raise ValueError(
                    f"{role}.replicas: PD disaggregation needs at least one {role} worker "
                    f"(got {role}.replicas=0, {other}.replicas={self.group(other).replicas})"
                )
        return self

    def group(self, role: str) -> WorkerGroupConfig:
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        raise ValueError(f"unknown role {role!r}")

    def app_for(self, role: str) -> AppConfig:
        """The app factory of a role ('prefill', 'decode' or 'router')."""
        if role == "router":
            return self.router.app or self.router_app
        return self.group(role).app or self.worker_app
