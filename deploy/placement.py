"""Resource checks and placement: does the fleet fit the Ray cluster, and where does each worker go.

Each worker reserves its own placement group of one bundle (see
:meth:`pdserve.deploy.config.WorkerGroupConfig.bundle`), named ``<fleet>-<role>-<index>``, so
prefill and decode capacity are held separately and scale independently. The actor is created
with ``placement_group_capture_child_tasks=True`` so anything it starts (e.g. TP ranks of an
engine that uses Ray itself) stays inside the reservation instead of competing for a second one.

:func:`check_fits` turns "this can never be placed" into a :class:`ConfigError` naming the field
(``fleet.decode.tp_size: ...``) before anything starts; on an autoscaling cluster it is advisory
(nodes of the right type may still be added) and the placement timeout reports the same facts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pdserve.deploy.config import ROLES, FleetConfig
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

_FIELD_OF = {"CPU": "num_cpus", "GPU": "tp_size", "memory": "memory_gb"}


def _field(role: str, resource: str) -> str:
    return f"fleet.{role}.{_FIELD_OF.get(resource, f'resources.{resource}')}"


def _fmt(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / 1024**3:.3g} GiB memory"
    return f"{amount:g} {resource}"


def alive_node_resources(nodes: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """``ray.nodes()`` -> the total resources of each alive node."""
    return [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive")]


def check_fits(
    fleet: FleetConfig,
    nodes: Sequence[Mapping[str, float]],
    *,
    replicas: Mapping[str, int] | None = None,
    gpu: bool = False,
    router: bool = True,
) -> None:
    """Raise :class:`ConfigError` when a worker's bundle fits on no node, or the whole fleet
    exceeds the cluster's totals. ``replicas`` overrides the configured counts (for ``scale``);
    ``gpu``: the engine runs on CUDA (bundles then hold ``tp_size`` GPUs)."""
    if not nodes:
        raise ConfigError("the Ray cluster has no alive node")
    counts = {role: fleet.group(role).replicas for role in ROLES}
    counts.update(replicas or {})
    for role in ROLES:
        if counts[role] == 0:
            continue
        group = fleet.group(role)
        bundle = group.bundle(gpu=gpu)
        if any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
            continue
        # Name the first resource that no node has enough of.
        for res, need in bundle.items():
            best = max(node.get(res, 0.0) for node in nodes)
            if best < need:
                raise ConfigError(
                    f"{_field(role, res)}: a {role} worker needs {_fmt(res, need)} on one node, "
                    f"but the largest node of the Ray cluster has {_fmt(res, best)}",
                    param=_field(role, res),
                )
        raise ConfigError(
            f"fleet.{role}: no single node has all of {bundle} at once", param=f"fleet.{role}"
        )
    totals: dict[str, float] = {}
    for role in ROLES:
        for res, need in fleet.group(role).bundle(gpu=gpu).items():
            totals[res] = totals.get(res, 0.0) + need * counts[role]
    if router and fleet.router.num_cpus:
        totals["CPU"] = totals.get("CPU", 0.0) + fleet.router.num_cpus
    for res, need in sorted(totals.items()):
        have = sum(node.get(res, 0.0) for node in nodes)
        if have + 1e-9 < need:
            roles = [r for r in ROLES if res in fleet.group(r).bundle(gpu=gpu) and counts[r]]
            fields = "/".join(f"fleet.{r}.replicas" for r in roles) or "fleet.router.num_cpus"
            raise ConfigError(
                f"{fields}: the fleet needs {_fmt(res, need)} in total "
                f"({', '.join(f'{counts[r]} {r}' for r in ROLES)}), the Ray cluster has {_fmt(res, have)}",
                param=fields,
            )


def local_cluster_cpus(fleet: FleetConfig) -> int:
    """Logical CPUs for an embedded cluster: the fleet's need, room to scale, at least 8."""
    need = sum(fleet.group(r).num_cpus * fleet.group(r).replicas for r in ROLES) + fleet.router.num_cpus
    return max(8, math.ceil(need * 2) + 2)


def local_node(num_cpus: int, num_gpus: int | None) -> dict[str, float]:
    """The resources an embedded single-node cluster will have (GPUs unknown until Ray looks:
    ``None`` counts as plenty; the check after start is exact)."""
    return {"CPU": float(num_cpus), "GPU": float(num_gpus) if num_gpus is not None else 1e9, "memory": 1e18}


def check_model(model: str | None) -> None:
    """``engine.model``, when set, must be a local directory with a ``config.json``."""
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"engine.model: {model!r} is not a directory", param="engine.model")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"engine.model: {model!r} has no config.json (not a Hugging Face model directory)",
            param="engine.model",
        )


def actor_error_summary(exc: BaseException) -> str:
    """The one line that matters in a Ray actor error (the original exception's summary)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("pdserve.errors.", "ray.exceptions."):
        if last.startswith(prefix):
            last = last[len(prefix) :]
    return last[:500]
