"""The controller's HTTP calls (against httpx.MockTransport: no sockets) and answer parsing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pdserve.deploy.registry import FleetHttp, Load, parse_load, worker_urls

pytestmark = pytest.mark.unit

ROUTER = "http://127.0.0.1:8000"


class FakeRouter:
    """Just enough of the router's /workers API, plus a worker's /health and /get_load."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.healthy = True
        self.load: Any = {"num_reqs": 2, "num_waiting_reqs": 1, "kv_usage": 0.25, "transport": "shm"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        self.calls.append((method, path))
        if path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        if path == "/get_load":
            return httpx.Response(200, json=self.load)
        if path == "/workers" and method == "POST":
            body = json.loads(request.content)
            if body["url"] in self.workers:
                return httpx.Response(409, json={"error": {"message": "exists"}})
            self.workers[body["url"]] = body
            return httpx.Response(200, json=body)
        if path == "/workers" and method == "DELETE":
            url = request.url.params.get("url")
            if url not in self.workers:
                return httpx.Response(404)
            del self.workers[url]
            return httpx.Response(200)
        if path == "/workers" and method == "GET":
            return httpx.Response(200, json={"workers": list(self.workers.values())})
        return httpx.Response(404)


@pytest.fixture
def router() -> FakeRouter:
    return FakeRouter()


@pytest.fixture
async def http(router: FakeRouter) -> Any:
    client = FleetHttp(timeout_s=1.0, transport=httpx.MockTransport(router))
    yield client
    await client.aclose()


async def test_register_list_deregister(http: FleetHttp, router: FakeRouter) -> None:
    url = "http://127.0.0.1:30001"
    assert await http.register(ROUTER, url=url, role="prefill", bootstrap_port=8998)
    assert router.workers[url] == {"url": url, "role": "prefill", "bootstrap_port": 8998}
    assert await http.register(ROUTER, url=url, role="prefill", bootstrap_port=8998)  # 409 = known
    assert await http.registered_urls(ROUTER) == {url}
    assert await http.deregister(ROUTER, url=url)
    assert await http.deregister(ROUTER, url=url)  # 404: already gone counts as removed
    assert await http.registered_urls(ROUTER) == set()


async def test_probes(http: FleetHttp, router: FakeRouter) -> None:
    assert await http.healthy("http://w:1")
    assert await http.load("http://w:1") == Load(running=2, waiting=1, kv_usage=0.25, transport="shm")
    router.healthy = False
    assert not await http.healthy("http://w:1")
    router.load = "not json object"
    assert await http.load("http://w:1") == Load()


async def test_failures_are_values_not_exceptions() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = FleetHttp(timeout_s=0.5, transport=httpx.MockTransport(refuse))
    try:
        assert not await http.healthy("http://w:1")
        assert await http.load("http://w:1") is None
        assert not await http.register(ROUTER, url="http://w:1", role="decode", bootstrap_port=None)
        assert not await http.deregister(ROUTER, url="http://w:1")
        assert await http.registered_urls(ROUTER) is None
    finally:
        await http.aclose()


def test_parse_load_shapes() -> None:
    # SGLang answers one dict per DP rank: counts add up, KV usage is the worst rank's
    ranks = [
        {"num_reqs": 3, "num_waiting_reqs": 0, "token_usage": 0.5},
        {"num_reqs": 1, "num_waiting_reqs": 2, "token_usage": 0.75, "kv_transport": "nccl"},
    ]
    assert parse_load(ranks) == Load(running=4, waiting=2, kv_usage=0.75, transport="nccl")
    assert parse_load({"running": 1}) == Load(running=1)
    assert parse_load({"num_reqs": True}) == Load()  # bools are not counts
    assert parse_load(None) == Load()
    assert parse_load({"kv_usage": 0.1}).as_dict() == {
        "running": None, "waiting": None, "kv_usage": 0.1, "transport": None,
    }


def test_worker_urls_shapes() -> None:
    assert worker_urls({"workers": [{"url": "http://a:1/"}, {"url": "http://b:2"}]}) == {"http://a:1", "http://b:2"}
    assert worker_urls({"prefill": ["http://a:1"], "decode": [{"url": "http://b:2", "role": "decode"}]}) == {
        "http://a:1", "http://b:2",
    }
    assert worker_urls(["not a url", 3]) == set()
