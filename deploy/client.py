"""Driver-side handle on a fleet: create its controller, wait, ask, scale, tear down.

The controller is a detached named actor (``<fleet>-controller`` in the fleet's Ray namespace)
pinned to the head node, so a fleet outlives the ``pdserve up`` that created it (``--detach``)
and any later ``pdserve status/scale/down`` finds it by name. Every call here is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pdserve.config import PdserveConfig
from pdserve.errors import ConfigError, PdserveError, RequestTimeoutError, WorkerError

logger = logging.getLogger(__name__)

HEAD_NODE_RESOURCE = "node:__internal_head__"


def controller_name(fleet: str) -> str:
    return f"{fleet}-controller"


def _get(ref: Any, timeout_s: float) -> Any:
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError as exc:
        raise RequestTimeoutError(f"the fleet controller did not answer within {timeout_s:.0f} s") from exc
    except RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, PdserveError):
            raise type(cause)(cause.message, **cause.details) from None
        raise WorkerError(f"the fleet controller failed: {exc}") from exc


class Fleet:
    def __init__(self, controller: Any, *, name: str, namespace: str, rpc_s: float) -> None:
        self.controller = controller
        self.name = name
        self.namespace = namespace
        self.rpc_s = rpc_s

    @classmethod
    def create(cls, cfg: PdserveConfig, *, strict_resources: bool) -> Fleet:
        import ray

        from pdserve.deploy.controller import FleetController

        fleet = cfg.fleet
        remote = ray.remote(FleetController)
        try:
            handle = remote.options(
                name=controller_name(fleet.name),
                namespace=fleet.ray.namespace,
                lifetime="detached",
                max_restarts=-1,
                num_cpus=0,
                resources={HEAD_NODE_RESOURCE: 0.001},
            ).remote(cfg.model_dump(mode="json"), strict_resources=strict_resources)
        except ValueError as exc:
            raise ConfigError(
                f"fleet {fleet.name!r} is already running in this Ray cluster "
                "(`pdserve status`, or `pdserve down` first)"
            ) from exc
        out = cls(handle, name=fleet.name, namespace=fleet.ray.namespace, rpc_s=fleet.timeouts.rpc_s)
        out.ping(timeout_s=fleet.timeouts.startup_s)
        return out

    @classmethod
    def find(cls, name: str, namespace: str, *, rpc_s: float = 10.0) -> Fleet | None:
        import ray

        try:
            handle = ray.get_actor(controller_name(name), namespace=namespace)
        except ValueError:
            return None
        return cls(handle, name=name, namespace=namespace, rpc_s=rpc_s)

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return dict(_get(self.controller.ping.remote(), timeout_s or self.rpc_s))

    def status(self) -> dict[str, Any]:
        return dict(_get(self.controller.status.remote(), self.rpc_s))

    def wait_ready(
        self, timeout_s: float, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Poll until the router and all desired workers are healthy and registered; raises
        :class:`WorkerError` naming the failure when a worker cannot start."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if on_progress is not None:
                on_progress(st)
            if st["ready"]:
                return st
            failed = [w for w in st["workers"] if w["state"] == "failed"]
            if st["router"]["state"] == "failed":
                raise WorkerError(f"the router failed to start: {st['router']['error']}")
            if st["halted"] or failed:
                why = "; ".join(f"{w['name']}: {w['error']}" for w in failed) or str(st["halted"])
                raise WorkerError(f"the fleet cannot start: {why}")
            if time.monotonic() > deadline:
                raise RequestTimeoutError(f"the fleet was not ready within {timeout_s:.0f} s")
            time.sleep(0.25)

    def scale(self, counts: dict[str, int], *, wait: bool, timeout_s: float) -> dict[str, Any]:
        return dict(_get(self.controller.scale.remote(counts, wait=wait), timeout_s))

    def down(self, *, drain: bool, timeout_s: float) -> dict[str, Any]:
        """Tear the fleet down and kill the controller (even when the teardown failed)."""
        import ray

        try:
            return dict(_get(self.controller.shutdown.remote(drain=drain), timeout_s))
        finally:
            with contextlib.suppress(Exception):
                ray.kill(self.controller, no_restart=True)


def remove_leftovers(fleet: str, namespace: str) -> list[str]:
    """Kill actors and remove placement groups named after ``fleet`` that are still around
    (a controller that died mid-teardown). Returns what was removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed: list[str] = []
    prefix = f"{fleet}-"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(prefix):
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
                removed.append(entry["name"])
    for pg_id, info in ray.util.placement_group_table().items():
        name = str(info.get("name") or "")
        if name.startswith(prefix) and info.get("state") != "REMOVED":
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                removed.append(f"placement group {name}")
    return removed
