"""The fleet controller's monitor loop against a draining worker (no Ray, no sockets)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pdserve.deploy.controller import FleetController
from pdserve.deploy.handles import ActorSlot
from pdserve.deploy.metrics import FleetMetrics
from pdserve.deploy.registry import FleetHttp

pytestmark = pytest.mark.unit

ROUTER = "http://127.0.0.1:8000"
WORKER = "http://127.0.0.1:9001"


class _Router:
    """The router's /workers API plus a worker's /health, recorded."""

    def __init__(self) -> None:
        self.workers: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/get_load":
            return httpx.Response(200, json={"num_reqs": 0})
        if request.url.path == "/workers" and request.method == "POST":
            self.workers.add(json.loads(request.content)["url"])
            return httpx.Response(200, json={})
        if request.url.path == "/workers" and request.method == "DELETE":
            self.workers.clear()
            return httpx.Response(200)
        return httpx.Response(404)


class _GatedInfo:
    """``actor.info.remote()`` that answers only once the test opens the gate."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.gate = asyncio.Event()
        self.info = info

    def remote(self) -> Any:
        async def answer() -> dict[str, Any]:
            await self.gate.wait()
            return self.info

        return answer()


async def test_a_probe_in_flight_never_re_registers_a_worker_that_started_draining() -> None:
    router = _Router()
    ctrl = FleetController.__new__(FleetController)
    ctrl.http = FleetHttp(timeout_s=1.0, transport=httpx.MockTransport(router))
    ctrl.fleet = SimpleNamespace(name="t")
    ctrl.timeouts = SimpleNamespace(rpc_s=5.0, unhealthy_after=2, startup_s=60.0)
    ctrl.metrics = FleetMetrics(CollectorRegistry())
    ctrl.events = deque(maxlen=10)
    info = {"url": WORKER, "incarnation": "a", "pid": 1, "started_at": time.time()}
    ctrl.router = ActorSlot(name="r", role="router", state="healthy", info={"url": ROUTER})
    slot = ActorSlot(name="w", role="decode", state="healthy", info=dict(info), registered_url=WORKER)
    slot.actor = SimpleNamespace(info=_GatedInfo(info))
    ctrl.workers = {"w": slot}
    router.workers.add(WORKER)
    try:
        probe = asyncio.create_task(ctrl._probe(slot))
        await asyncio.sleep(0.01)  # the probe now waits on actor.info()
        slot.busy, slot.state = True, "draining"  # what _remove does first ...
        await ctrl._deregister(slot)  # ... then it takes the worker off the router
        assert router.workers == set()
        slot.actor.info.gate.set()
        await asyncio.wait_for(probe, 5.0)
        assert router.workers == set(), "a draining worker was registered again"
        assert slot.registered_url is None and slot.state == "draining"
    finally:
        await ctrl.http.aclose()
