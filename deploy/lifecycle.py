"""Ray mechanics of one fleet actor: place it, start it, drain it, release it.

Lifecycle of a worker slot:

1. :func:`launch` reserves the worker's placement group (one bundle, named like the actor),
   waits for it at most ``placement_s``, creates the detached, restartable
   :class:`~pdserve.deploy.server_actor.ServerActor` inside it and waits at most ``startup_s``
   for its server info. On any failure the caller calls :func:`release`.
2. :func:`drain` waits until the server has no request in flight (after ``drain_grace_s``, at
   most ``drain_s``).
3. :func:`release` stops the server gracefully (bounded), kills the actor without restart and
   removes its placement group. Idempotent; never raises.

The router slot has no placement group (it is one small process, pinned by ``resources`` if
the operator wants it on the head node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pdserve.config import PdserveConfig
from pdserve.deploy.config import FleetTimeouts
from pdserve.deploy.handles import ActorSlot
from pdserve.deploy.server_actor import ServerActor, ServerSpec
from pdserve.errors import ConfigError, OverloadedError

logger = logging.getLogger(__name__)


async def call(method: Any, *args: Any, timeout_s: float) -> Any:
    """``await method.remote(*args)`` bounded by ``timeout_s`` (raises ``TimeoutError``)."""
    return await asyncio.wait_for(_awaitable(method.remote(*args)), timeout_s)


async def _awaitable(ref: Any) -> Any:
    return await ref


def is_permanent(exc: BaseException) -> bool:
    """True when the actor is dead for good (restarts exhausted or its restart failed)."""
    from ray.exceptions import ActorDiedError

    return isinstance(exc, ActorDiedError)


def server_spec(s: ActorSlot, cfg: PdserveConfig, config_data: dict[str, Any]) -> ServerSpec:
    fleet = cfg.fleet
    app = fleet.app_for(s.role)
    kwargs = {**app.kwargs, "config": config_data}
    startup_s, graceful_s = fleet.timeouts.startup_s, fleet.timeouts.shutdown_s
    if s.role == "router":
        return ServerSpec(
            name=s.name, role="router", factory=app.factory, kwargs=kwargs,
            host=cfg.router.host, port=cfg.router.port, startup_s=startup_s, graceful_s=graceful_s,
        )
    group = fleet.group(s.role)
    return ServerSpec(
        name=s.name, role=s.role, factory=app.factory, kwargs=kwargs,
        host=fleet.worker_host, port=group.port,
        bootstrap_port=group.bootstrap_port if s.role == "prefill" else None,
        startup_s=startup_s, graceful_s=graceful_s,
    )


def actor_options(s: ActorSlot, cfg: PdserveConfig) -> dict[str, Any]:
    """Ray options for the slot's actor (resources, restarts, placement)."""
    fleet = cfg.fleet
    opts: dict[str, Any] = {
        "name": s.name,
        "namespace": fleet.ray.namespace,
        "lifetime": "detached",
        "max_concurrency": 4,  # info()/in_flight() stay answerable while shutdown() waits
    }
    if s.role == "router":
        return {
            **opts,
            "num_cpus": fleet.router.num_cpus,
            "resources": dict(fleet.router.resources),
            "max_restarts": fleet.router.max_restarts,
        }
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = fleet.group(s.role)
    bundle = group.bundle(gpu=cfg.uses_gpu)
    opts.update(
        num_cpus=bundle.get("CPU", 0.0),
        num_gpus=bundle.get("GPU", 0.0),
        resources={k: v for k, v in bundle.items() if k not in {"CPU", "GPU", "memory"}},
        max_restarts=group.max_restarts,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            s.pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        ),
    )
    if "memory" in bundle:
        opts["memory"] = bundle["memory"]
    return opts


async def launch(s: ActorSlot, cfg: PdserveConfig, config_data: dict[str, Any]) -> None:
    """Place and start the slot's actor; fills ``s.pg``, ``s.actor`` and ``s.info``."""
    import ray
    from ray.util.placement_group import placement_group

    t = cfg.fleet.timeouts
    if s.role != "router":
        bundle = cfg.fleet.group(s.role).bundle(gpu=cfg.uses_gpu)
        s.state = "pending"
        s.pg = placement_group([bundle], strategy="PACK", name=s.name, lifetime="detached")
        try:
            await asyncio.wait_for(_awaitable(s.pg.ready()), t.placement_s)
        except TimeoutError:
            free = {k: v for k, v in ray.available_resources().items() if not k.startswith("node:")}
            raise OverloadedError(
                f"{s.name}: no room for its bundle {bundle} within {t.placement_s:.0f} s "
                f"(free now: {free}); add nodes or lower fleet.{s.role}.replicas"
            ) from None
    s.state = "starting"
    remote_cls = ray.remote(ServerActor)
    try:
        s.actor = remote_cls.options(**actor_options(s, cfg)).remote(server_spec(s, cfg, config_data))
    except ValueError as exc:  # name taken: a fleet of that name is already running
        raise ConfigError(
            f"{s.name}: {exc} (is fleet {cfg.fleet.name!r} already up? run `pdserve down`)"
        ) from exc
    s.info = await call(s.actor.info, timeout_s=t.startup_s + t.rpc_s)


async def drain(s: ActorSlot, t: FleetTimeouts, clock: Callable[[], float] = time.monotonic) -> float:
    """Wait until ``s``'s server has nothing in flight; returns the seconds waited."""
    start = clock()
    await asyncio.sleep(t.drain_grace_s)
    while clock() - start < t.drain_s:
        try:
            n = await call(s.actor.in_flight, timeout_s=t.rpc_s)
        except Exception:  # dead or unreachable: nothing left to drain
            break
        if n == 0:
            break
        await asyncio.sleep(0.05)
    else:
        logger.warning("%s: still busy after draining %.0f s; stopping it anyway", s.name, t.drain_s)
    return clock() - start


async def release(s: ActorSlot, t: FleetTimeouts, *, graceful: bool = True) -> None:
    """Stop, kill and un-place the slot's actor. Never raises; safe to repeat."""
    import ray
    from ray.util.placement_group import remove_placement_group

    actor, pg = s.actor, s.pg
    s.actor = s.pg = None
    if actor is not None:
        if graceful and s.state != "failed":
            with contextlib.suppress(Exception):
                await call(actor.shutdown, t.shutdown_s, timeout_s=t.shutdown_s + t.rpc_s)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)
