"""Background loops: worker health checks and load polling.

Lifecycle:

1. ``start()`` launches two tasks on the running loop.
2. Health loop, every ``health.interval_s``: GET ``health.endpoint`` on every worker at once
   (each bounded by ``health.timeout_s``). ``failure_threshold`` consecutive failures take a
   worker out of routing; ``success_threshold`` consecutive successes put it back.
3. Load loop, every ``load.interval_s``: GET ``load.endpoint`` (SGLang's ``/get_load``) and store
   the parsed :class:`~pdserve.router.workers.LoadReport`; a failed poll leaves the old report to
   go stale (policies ignore reports older than ``load.stale_after_s``).
4. ``aclose()`` cancels both tasks and waits for them (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from pdserve.errors import PdserveError
from pdserve.router.config import RouterConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.upstream import HttpClient
from pdserve.router.workers import Worker, WorkerRegistry, parse_load

logger = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        cfg: RouterConfig,
        registry: WorkerRegistry,
        client: HttpClient,
        metrics: RouterMetrics,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.client = client
        self.metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            return
        if self.cfg.health.enabled:
            self._tasks.append(asyncio.create_task(self._loop(self.cfg.health.interval_s, self.check_all)))
        if self.cfg.load.enabled:
            self._tasks.append(asyncio.create_task(self._loop(self.cfg.load.interval_s, self.poll_all)))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def _loop(self, interval_s: float, body: Callable[[], Awaitable[None]]) -> None:
        while True:
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one round must not stop monitoring
                logger.exception("router background round failed")
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    # ---- health ------------------------------------------------------------------------------
    async def probe(self, w: Worker) -> bool:
        """One health probe (no state change)."""
        h = self.cfg.health
        try:
            await self.client.get_json(w.addr, h.endpoint, h.timeout_s)
        except PdserveError as exc:
            logger.debug("health probe of %s failed: %s", w.url, exc)
            return False
        return True

    def apply_probe(self, w: Worker, ok: bool) -> None:
        h = self.cfg.health
        if ok:
            w.health_fails = 0
            w.health_oks += 1
            if not w.healthy and w.health_oks >= h.success_threshold:
                w.healthy = True
                logger.info("worker %s (%s) is healthy again", w.url, w.role)
                self.metrics.worker_healthy.labels(w.url, w.role).set(1)
        else:
            w.health_oks = 0
            w.health_fails += 1
            if w.healthy and w.health_fails >= h.failure_threshold:
                w.healthy = False
                logger.warning("worker %s (%s) failed %d health checks; removed from routing",
                               w.url, w.role, w.health_fails)
                self.metrics.worker_healthy.labels(w.url, w.role).set(0)

    async def check_all(self) -> None:
        workers = self.registry.all()
        if workers:
            results = await asyncio.gather(*(self.probe(w) for w in workers))
            for w, ok in zip(workers, results, strict=True):
                if not w.removed:
                    self.apply_probe(w, ok)

    # ---- load --------------------------------------------------------------------------------
    async def poll(self, w: Worker) -> None:
        ld = self.cfg.load
        try:
            payload = await self.client.get_json(w.addr, ld.endpoint, ld.timeout_s)
        except PdserveError as exc:
            logger.debug("load poll of %s failed: %s", w.url, exc)
            return
        w.load = parse_load(payload, time.monotonic())

    async def poll_all(self) -> None:
        workers = self.registry.all()
        if workers:
            await asyncio.gather(*(self.poll(w) for w in workers))
        m = self.metrics
        for w in workers:
            if w.removed:
                continue
            with contextlib.suppress(KeyError):
                m.worker_inflight.labels(w.url, w.role).set(w.inflight_requests)
                m.worker_queued_tokens.labels(w.url, w.role).set(
                    max(w.load.waiting_prefill_tokens, w.inflight_prefill_tokens)
                )
