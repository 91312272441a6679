"""The fleet controller: a named, detached async Ray actor that owns one fleet.

Lifecycle:

1. ``__init__`` validates the config, adopts this fleet's actors and placement groups that
   already exist (after a controller restart the fleet keeps serving; the desired counts become
   what was found), serves its own ``/metrics`` and starts the monitor loop.
2. The monitor loop (every ``fleet.timeouts.health_interval_s``) probes the router and every
   worker: actor ``info()`` (a new incarnation = Ray restarted it: its old URL is deregistered),
   ``GET /health`` (healthy -> registered with the router via ``POST /workers``;
   ``unhealthy_after`` failures -> ``DELETE /workers``), ``GET /get_load``. A new router
   incarnation gets every worker registered again, and every few ticks the router's own list is
   reconciled. Missing workers are launched (placement group -> actor -> ``info()``), so the
   same loop brings the fleet up, replaces workers that died for good and follows ``scale``.
3. :meth:`FleetController.scale` changes the desired counts; removal picks unhealthy workers
   first, then the newest: deregister, wait ``drain_grace_s``, wait until the server has no
   request in flight (at most ``drain_s``), stop it, kill the actor, remove its placement group.
4. :meth:`FleetController.shutdown` stops the loop, stops the router gracefully (in-flight
   requests finish), then drains and removes every worker, and releases metrics server, HTTP
   client and service-discovery file. The caller then kills the controller actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.config import PdserveConfig, parse_config
from pdserve.deploy import lifecycle
from pdserve.deploy.config import ROLES
from pdserve.deploy.handles import SLOT_NAME, ActorSlot, slot_name
from pdserve.deploy.metrics import FleetMetrics, sd_groups, write_sd_file
from pdserve.deploy.placement import actor_error_summary, alive_node_resources, check_fits
from pdserve.deploy.registry import FleetHttp
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

_ROUTER_RECONCILE_EVERY = 5  # ticks


class FleetController:
    """Runs as ``ray.remote(FleetController)`` (async actor); plain object in unit tests."""

    def __init__(self, config: dict[str, Any], *, strict_resources: bool = False) -> None:
        self.cfg: PdserveConfig = parse_config(config, source="fleet controller")
        self.config_data = self.cfg.model_dump(mode="json")
        self.fleet = self.cfg.fleet
        self.timeouts = self.fleet.timeouts
        self.namespace = self.fleet.ray.namespace
        self.strict_resources = strict_resources
        self.metrics = FleetMetrics(CollectorRegistry())
        self.metrics_port = self.metrics.serve(self.fleet.worker_host, self.fleet.metrics_port)
        self.http = FleetHttp(timeout_s=self.timeouts.health_timeout_s)
        self.router = ActorSlot(name=slot_name(self.fleet.name, "router"), role="router")
        self.workers: dict[str, ActorSlot] = {}
        self.desired = {role: self.fleet.group(role).replicas for role in ROLES}
        self.next_index = dict.fromkeys(ROLES, 0)
        self.halted: dict[str, str] = {}  # role -> why launching stopped (until the next scale)
        self.events: deque[str] = deque(maxlen=200)
        self._lock = asyncio.Lock()
        self._closing = False
        self._ticks = 0
        self._sd_written: list[dict[str, Any]] | None = None
        self._adopt()
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    # -- public API (actor methods) ------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        return {"fleet": self.fleet.name, "pid": os.getpid()}

    async def status(self) -> dict[str, Any]:
        workers = sorted(self.workers.values(), key=lambda s: (ROLES.index(s.role), s.index))
        ready = self.router.state == "healthy" and all(
            sum(1 for s in workers if s.role == role and s.state == "healthy" and s.registered_url)
            >= self.desired[role]
            for role in ROLES
        )
        return {
            "fleet": self.fleet.name,
            "ready": ready,
            "router": self.router.describe(),
            "workers": [s.describe() for s in workers],
            "desired": dict(self.desired),
            "halted": dict(self.halted),
            "controller": {"pid": os.getpid(), "metrics_port": self.metrics_port},
            "events": list(self.events)[-30:],
        }

    async def scale(self, counts: dict[str, int], *, wait: bool = True) -> dict[str, Any]:
        """Set the desired replicas per role (``{"prefill": 2}``); returns once added workers
        are healthy and registered and removed ones are drained and gone (or on timeout)."""
        for role, n in counts.items():
            if role not in ROLES:
                raise ConfigError(f"unknown role {role!r} (roles: {', '.join(ROLES)})", param=role)
            if n < 1:
                raise ConfigError(f"--{role} {n}: a PD fleet needs at least one {role} worker", param=role)
        async with self._lock:
            self._check_resources({**self.desired, **counts})
            self.halted.clear()
            self._forget_failed()
            removals = []
            for role, n in counts.items():
                self.desired[role] = n
                live = [s for s in self.workers.values() if s.role == role and s.state != "draining"]
                for victim in sorted(live, key=_removal_order)[: max(0, len(live) - n)]:
                    removals.append(self._remove(victim, drain=True))
            self._event(f"scale to {self.desired}")
            self._launch_missing()
            await asyncio.gather(*removals)
            if wait:
                await self._wait_ready(self.timeouts.startup_s + self.timeouts.placement_s)
        return await self.status()

    async def shutdown(self, *, drain: bool = True) -> dict[str, Any]:
        """Tear the fleet down; returns a summary. Safe to call twice."""
        self._closing = True
        self._monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._monitor
        async with self._lock:
            for s in [*self.workers.values(), self.router]:
                if s.task is not None:
                    s.task.cancel()
            await self._stop_router(drain=drain)
            removed = [s.name for s in self.workers.values()]
            await asyncio.gather(*(self._remove(s, drain=drain) for s in list(self.workers.values())))
            await lifecycle.release(self.router, self.timeouts)
            self.metrics.close()
            await self.http.aclose()
            if self.fleet.prometheus_sd_file:
                await asyncio.to_thread(Path(self.fleet.prometheus_sd_file).unlink, missing_ok=True)
        self._event("fleet down")
        return {"removed": removed}

    # -- adoption and launching ------------------------------------------------------------------

    def _adopt(self) -> None:
        """Pick up this fleet's actors left by a previous controller incarnation."""
        import ray

        listed = ray.util.list_named_actors(all_namespaces=True)
        names = {a["name"] for a in listed if a["namespace"] == self.namespace}
        if self.router.name in names:
            self.router.actor = ray.get_actor(self.router.name, namespace=self.namespace)
            self.router.state = "restarting"
        found = dict.fromkeys(ROLES, 0)
        for name in sorted(names):
            m = SLOT_NAME.match(name)
            if not m or m["fleet"] != self.fleet.name:
                continue
            s = ActorSlot(name=name, role=m["role"], index=int(m["index"]), state="restarting")
            s.actor = ray.get_actor(name, namespace=self.namespace)
            with contextlib.suppress(Exception):
                s.pg = ray.util.get_placement_group(name)
            self.workers[name] = s
            found[s.role] += 1
            self.next_index[s.role] = max(self.next_index[s.role], s.index + 1)
        for role in ROLES:
            if found[role]:
                self.desired[role] = found[role]
        if any(found.values()):
            self._event(f"adopted {found['prefill']} prefill and {found['decode']} decode workers")

    def _check_resources(self, counts: dict[str, int]) -> None:
        import ray

        nodes = alive_node_resources(ray.nodes())
        try:
            check_fits(self.fleet, nodes, replicas=counts, gpu=self.cfg.uses_gpu)
        except ConfigError as exc:
            if self.strict_resources:
                raise
            logger.warning("%s (the autoscaler may still add nodes)", exc)

    def _launch_missing(self) -> None:
        if self._closing:
            return
        if self.router.actor is None and self.router.task is None:
            self.router.task = asyncio.create_task(self._launch(self.router))
        for role in ROLES:
            if role in self.halted:
                continue
            live = [
                s for s in self.workers.values() if s.role == role and s.state not in ("draining", "failed")
            ]
            for _ in range(self.desired[role] - len(live)):
                index = self.next_index[role]
                self.next_index[role] += 1
                s = ActorSlot(name=slot_name(self.fleet.name, role, index), role=role, index=index)
                self.workers[s.name] = s
                s.task = asyncio.create_task(self._launch(s))

    async def _launch(self, s: ActorSlot) -> None:
        s.busy = True
        try:
            await lifecycle.launch(s, self.cfg, self.config_data)
            s.state = "starting"
            self._event(f"{s.name} started at {s.url} (pid {s.info and s.info['pid']})")
        except asyncio.CancelledError:
            await lifecycle.release(s, self.timeouts)
            raise
        except Exception as exc:
            s.state, s.error = "failed", actor_error_summary(exc)
            if s.role in ROLES:
                self.halted[s.role] = s.error
            self._event(f"{s.name} failed to start: {s.error}")
            await lifecycle.release(s, self.timeouts)
        finally:
            s.busy, s.task = False, None

    def _forget_failed(self) -> None:
        for name in [n for n, s in self.workers.items() if s.state == "failed" and not s.busy]:
            del self.workers[name]

    # -- monitoring --------------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while not self._closing:
            started = time.monotonic()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything one tick does
                logger.exception("fleet monitor tick failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.05, self.timeouts.health_interval_s - elapsed))

    async def _tick(self) -> None:
        self._ticks += 1
        await self._probe(self.router)
        probes = [s for s in self.workers.values() if not s.busy and s.state not in ("failed", "draining")]
        await asyncio.gather(*(self._probe(s) for s in probes))
        for s in [s for s in self.workers.values() if s.state == "failed" and s.ever_healthy]:
            # Died for good after serving: free it; _launch_missing starts a replacement.
            del self.workers[s.name]
            await lifecycle.release(s, self.timeouts)
        if self._ticks % _ROUTER_RECONCILE_EVERY == 0:
            await self._reconcile_router()
        self._launch_missing()
        self._publish()

    async def _probe(self, s: ActorSlot) -> None:
        if s.busy or s.actor is None:
            return
        old = s.info
        try:
            info = await lifecycle.call(s.actor.info, timeout_s=self.timeouts.rpc_s)
        except Exception as exc:
            await self._unreachable(s, exc)
            return
        if s.busy:
            return  # a removal (or launch) claimed the slot while we waited: it owns it now
        s.unreachable_since = None
        if old is not None and info["incarnation"] != old["incarnation"]:
            s.restarts += 1
            self._event(f"{s.name} restarted (pid {old['pid']} -> {info['pid']}, now {info['url']})")
            if s.role == "router":
                for w in self.workers.values():
                    w.registered_url = None  # the new router incarnation knows nobody
            else:
                self.metrics.restarts.labels(role=s.role).inc()
                await self._deregister(s)
        s.info = info
        ok = await self.http.healthy(info["url"])
        if s.busy:
            return  # claimed while the health check ran: never re-register a draining worker
        if s.role == "router":
            s.state = "healthy" if ok else "unhealthy"
            self.metrics.router_up.set(1 if ok else 0)
            return
        if ok:
            s.failures = 0
            s.state, s.ever_healthy, s.error = "healthy", True, None
            if s.registered_url is None:
                await self._register(s)
            s.load = await self.http.load(info["url"])
            return
        s.failures += 1
        if s.failures >= self.timeouts.unhealthy_after and s.state != "starting":
            s.state = "unhealthy"
            await self._deregister(s)
        elif s.state == "starting" and time.time() - float(info["started_at"]) > self.timeouts.startup_s:
            s.state, s.error = "failed", f"not healthy within {self.timeouts.startup_s:.0f} s"

    async def _unreachable(self, s: ActorSlot, exc: BaseException) -> None:
        now = time.monotonic()
        s.unreachable_since = s.unreachable_since or now
        if s.role == "router":
            self.metrics.router_up.set(0)
        elif s.registered_url is not None:
            await self._deregister(s)
        if lifecycle.is_permanent(exc) or now - s.unreachable_since > self.timeouts.startup_s:
            if s.state != "failed":
                s.state, s.error = "failed", actor_error_summary(exc)
                self._event(f"{s.name} is gone: {s.error}")
        elif s.state != "restarting":
            s.state = "restarting"
            self._event(f"{s.name} unreachable ({type(exc).__name__}); waiting for Ray to restart it")

    async def _register(self, s: ActorSlot) -> None:
        router_url = self.router.url
        if self.router.state != "healthy" or router_url is None or s.url is None or s.state == "draining":
            return
        if await self.http.register(router_url, url=s.url, role=s.role, bootstrap_port=s.bootstrap_port):
            s.registered_url = s.url
            self.metrics.registrations.labels(role=s.role, op="add").inc()
            self._event(f"{s.name} registered with the router ({s.url})")

    async def _deregister(self, s: ActorSlot) -> None:
        url, s.registered_url = s.registered_url, None
        router_url = self.router.url
        if url is None or router_url is None:
            return
        if await self.http.deregister(router_url, url=url):
            self.metrics.registrations.labels(role=s.role, op="remove").inc()
            self._event(f"{s.name} deregistered ({url})")

    async def _reconcile_router(self) -> None:
        if self.router.state != "healthy" or self.router.url is None:
            return
        known = await self.http.registered_urls(self.router.url)
        if known is None:
            return
        for s in self.workers.values():
            if s.registered_url is not None and s.registered_url not in known and not s.busy:
                s.registered_url = None  # the router dropped it; re-added while healthy
                self._event(f"{s.name} missing from the router; registering again")

    # -- removal -------------------------------------------------------------------------------

    async def _remove(self, s: ActorSlot, *, drain: bool) -> None:
        if s.task is not None:
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await s.task
        s.busy, s.state = True, "draining"
        await self._deregister(s)
        how = "without draining"
        if drain and s.actor is not None:
            waited = await lifecycle.drain(s, self.timeouts)
            self.metrics.drain.labels(role=s.role).observe(waited)
            how = f"after draining {waited:.1f} s"
        await lifecycle.release(s, self.timeouts)
        self.workers.pop(s.name, None)
        self._event(f"{s.name} removed {how}")

    async def _stop_router(self, *, drain: bool) -> None:
        if self.router.actor is None:
            return
        timeout = self.timeouts.drain_s if drain else self.timeouts.shutdown_s
        with contextlib.suppress(Exception):
            await lifecycle.call(self.router.actor.shutdown, timeout, timeout_s=timeout + self.timeouts.rpc_s)

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = await self.status()
            if st["ready"] or self.halted:
                return
            await asyncio.sleep(min(0.2, self.timeouts.health_interval_s))

    # -- outputs ---------------------------------------------------------------------------------

    def _publish(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for s in self.workers.values():
            counts[(s.role, s.state)] = counts.get((s.role, s.state), 0) + 1
        self.metrics.set_states(counts)
        for role in ROLES:
            self.metrics.desired.labels(role=role).set(self.desired[role])
        if not self.fleet.prometheus_sd_file:
            return
        # Every worker the fleet wants, healthy or not (a dead one must show as up == 0, not
        # vanish); a draining worker leaves at once. A restarted worker's new URL replaces its old.
        targets = [(s.role, s.url) for s in self.workers.values() if s.url and s.state != "draining"]
        if self.router.url:
            targets.append(("router", self.router.url))
        targets.append(("controller", f"http://{self.fleet.worker_host}:{self.metrics_port}"))
        groups = sd_groups(self.fleet.name, targets)
        if groups != self._sd_written:
            write_sd_file(self.fleet.prometheus_sd_file, groups)
            self._sd_written = groups

    def _event(self, text: str) -> None:
        logger.info("fleet %s: %s", self.fleet.name, text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def _removal_order(s: ActorSlot) -> tuple[int, int]:
    """Remove broken workers first, then the newest."""
    return (0 if s.state != "healthy" else 1, -s.index)
