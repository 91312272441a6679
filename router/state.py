"""Everything one router instance holds, built in the app's lifespan (no module-level state).

Lifecycle:

1. ``RouterState(cfg)`` builds the worker table, policy, the one pooled HTTP client, dispatcher,
   health monitor and metrics (against an injected or fresh CollectorRegistry).
2. ``start()`` starts health/load polling and finds the model: the tokenizer comes from
   ``cfg.model_path``, or from the ``model_path`` a worker reports on ``/get_model_info`` when it
   is a local directory (retried in the background until a worker answers).
3. Requests use ``prompt_key``, ``admit``/``release``, ``dispatcher`` and ``tokenizer``.
4. ``aclose()`` stops the loops, cancels draining prefill legs and closes the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.router.breaker import BreakerState
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import TooManyRequestsError
from pdserve.router.health import HealthMonitor
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import RoutingPolicy
from pdserve.router.prefix_index import PromptKey, key_from_ids, key_from_text
from pdserve.router.upstream import HttpClient
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger(__name__)


class RouterState:
    def __init__(
        self,
        cfg: RouterConfig,
        *,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics(registry if registry is not None else CollectorRegistry())
        self.workers = WorkerRegistry(
            cfg,
            on_breaker_change=lambda w, s: self._breaker_changed(w, s),
            on_membership_change=lambda w, added: self._membership_changed(w, added),
        )
        to = cfg.timeouts
        self.client = HttpClient(
            connect_s=to.connect_s, read_s=to.read_s, pool_idle_s=to.pool_idle_s,
            max_idle_per_addr=to.pool_max_idle_per_worker,
        )
        self.policy = RoutingPolicy(cfg.policy, cfg.load, rng=rng)
        self.dispatcher = Dispatcher(cfg, self.workers, self.policy, self.client, self.metrics, rng=rng)
        self.monitor = HealthMonitor(cfg, self.workers, self.client, self.metrics)
        for spec in cfg.workers:
            self.workers.add(spec)
        self.tokenizer: Any = tokenizer
        self.model_path: str | None = cfg.model_path
        self.served_model_name: str | None = cfg.served_model_name
        self.max_model_len: int | None = cfg.max_model_len
        self.inflight = 0
        self._needs_ids = cfg.policy.prefill == "cache_aware" or cfg.policy.local_prefill_threshold > 0
        self._discovery: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.monitor.start()
        if self.cfg.model_path is not None and self.tokenizer is None:
            self.tokenizer = await asyncio.to_thread(_load_tokenizer, self.cfg.model_path)
        if self.served_model_name is None and self.cfg.model_path is not None:
            self.served_model_name = Path(self.cfg.model_path).name
        if not await self.discover_model():
            self._discovery = asyncio.create_task(self._discover_loop())

    async def aclose(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            await asyncio.wait([self._discovery], timeout=2.0)
        await self.monitor.aclose()
        await self.dispatcher.aclose()
        await self.client.aclose()

    async def _discover_loop(self) -> None:
        delay = 1.0
        while not await self.discover_model():
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 1.5)

    async def discover_model(self) -> bool:
        """Fill served_model_name / model_path / tokenizer from a worker; True when done."""
        if self.served_model_name is not None and (self.tokenizer is not None or self.cfg.model_path):
            return True
        for w in self.workers.all():
            try:
                info = await self.client.get_json(w.addr, "/get_model_info", self.cfg.health.timeout_s)
                models = await self.client.get_json(w.addr, "/v1/models", self.cfg.health.timeout_s)
            except PdserveError:
                continue
            path = info.get("model_path") if isinstance(info, dict) else None
            if self.max_model_len is None:
                self.max_model_len = _max_model_len(models, info)
            if self.served_model_name is None:
                self.served_model_name = _first_model_id(models) or (
                    info.get("served_model_name") if isinstance(info, dict) else None
                ) or (Path(path).name if isinstance(path, str) else None)
            if self.tokenizer is None and isinstance(path, str):
                try:
                    self.tokenizer = await asyncio.to_thread(_load_tokenizer_if_dir, path)
                    if self.tokenizer is not None:
                        self.model_path = path
                except PdserveError as exc:
                    logger.warning("cannot load the tokenizer from worker model_path %s: %s", path, exc)
            if self.served_model_name is not None:
                if self.tokenizer is None:
                    logger.warning("no tokenizer: /v1 endpoints are unavailable until one is configured "
                                   "(--model DIR); native /generate works")
                logger.info("serving model %r (tokenizer from %s)", self.served_model_name, self.model_path)
                return True
        return False

    # ---- workers -----------------------------------------------------------------------------
    def _breaker_changed(self, w: Worker, state: BreakerState) -> None:
        logger.warning("circuit breaker of %s (%s) is now %s", w.url, w.role, state.name.lower())
        self.metrics.breaker(w.url, w.role, state)

    def _membership_changed(self, w: Worker, added: bool) -> None:
        if added:
            self.metrics.worker_added(w.url, w.role)
        else:
            self.metrics.worker_removed(w.url, w.role)
            self.client.drop(w.addr)
        reg = self.workers
        self.metrics.set_worker_counts(len(reg.prefill), len(reg.decode), len(reg.both))

    async def register(self, spec: WorkerSpec) -> Worker:
        """Add a worker (POST /workers); it is probed once and enters routing only if healthy."""
        w = self.workers.add(spec)
        if self.cfg.health.enabled:
            w.healthy = False  # not routable until the probe says so
            ok = await self.monitor.probe(w)
            w.healthy = ok
            if not ok:
                w.health_fails = self.cfg.health.failure_threshold
            self.metrics.worker_healthy.labels(w.url, w.role).set(1 if ok else 0)
        if self._discovery is None and self.served_model_name is None:
            self._discovery = asyncio.create_task(self._discover_loop())
        logger.info("registered %s worker %s (healthy=%s)", w.role, w.url, w.healthy)
        return w

    def unregister(self, url: str) -> Worker:
        w = self.workers.remove(url)
        logger.info("removed %s worker %s", w.role, w.url)
        return w

    # ---- requests ----------------------------------------------------------------------------
    def admit(self) -> None:
        limit = self.cfg.max_inflight_requests
        if limit is not None and self.inflight >= limit:
            raise TooManyRequestsError(f"the router has {self.inflight} requests in flight (limit {limit})")
        self.inflight += 1
        self.metrics.inflight = self.inflight

    def release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight = self.inflight

    def key_for_ids(self, ids: list[int]) -> PromptKey:
        return key_from_ids(ids, self.cfg.policy.block_size)

    def prompt_key(self, req: dict[str, Any]) -> tuple[PromptKey, int | None]:
        """The routing key of a native /generate body and its batch size (None: not batched)."""
        bs = self.cfg.policy.block_size
        ids = req.get("input_ids")
        if ids is not None:
            if not isinstance(ids, list) or not ids:
                raise InvalidRequestError("input_ids must be a non-empty list of token ids",
                                          param="input_ids")
            if isinstance(ids[0], list):
                if not all(isinstance(x, list) and x for x in ids):
                    raise InvalidRequestError("batched input_ids must be non-empty lists", param="input_ids")
                return key_from_ids(ids[0], bs), len(ids)
            if not isinstance(ids[0], int):
                raise InvalidRequestError("input_ids must hold integers", param="input_ids")
            return key_from_ids(ids, bs), None
        text = req.get("text")
        batch: int | None = None
        if isinstance(text, list):
            if not text or not all(isinstance(t, str) for t in text):
                raise InvalidRequestError("text must be a string or a non-empty list of strings",
                                          param="text")
            batch, text = len(text), text[0]
        if not isinstance(text, str):
            raise InvalidRequestError("one of text or input_ids is required", param="text")
        if self.tokenizer is not None and self._needs_ids:
            return key_from_ids(self.tokenizer.encode(text), bs), batch
        return key_from_text(text, bs), batch


def _first_model_id(models: Any) -> str | None:
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0]
        if isinstance(first, dict) and isinstance(first.get("id"), str):
            return str(first["id"])
    return None


def _max_model_len(models: Any, info: Any) -> int | None:
    candidates: list[Any] = []
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0]
        if isinstance(first, dict):
            candidates.append(first.get("max_model_len"))
    if isinstance(info, dict):
        candidates += [info.get("max_model_len"), info.get("context_length"), info.get("max_context_length")]
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and c > 1:
            return c
    return None


def _load_tokenizer_if_dir(path: str) -> Any:
    return _load_tokenizer(path) if os.path.isdir(path) else None


def _load_tokenizer(path: str) -> Any:
    from pdserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
