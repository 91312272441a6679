"""HTTP calls the fleet controller makes: router registration and worker probes.

Router registration follows the router's dynamic-registration API: ``POST /workers`` with
``{"url", "role", "bootstrap_port"}``, ``DELETE /workers?url=...`` (the URL also in a JSON body),
``GET /workers``. Worker probes: ``GET /health`` (healthy = 200) and ``GET /get_load`` (SGLang's
load endpoint; the fields the fleet shows are read leniently, see :func:`parse_load`).
Every call has a timeout; failures come back as values (``False`` / ``None``), never as hangs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """What ``/get_load`` told us. Unknown fields stay ``None``."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    transport: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "kv_usage": self.kv_usage,
            "transport": self.transport,
        }


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_load(body: Any) -> Load:
    """Read SGLang-style load answers: a dict, or a list of per-DP-rank dicts (summed).

    Accepted keys: ``num_reqs``/``running``, ``num_waiting_reqs``/``waiting``,
    ``kv_usage``/``token_usage``/``kv_cache_usage`` (0..1), ``transport``/``kv_transport``.
    """
    items = body if isinstance(body, list) else [body]
    dicts = [d for d in items if isinstance(d, dict)]
    if not dicts:
        return Load()

    def total(*keys: str) -> int | None:
        vals = [v for d in dicts for k in keys if (v := _num(d.get(k))) is not None]
        return int(sum(vals)) if vals else None

    usage_keys = ("kv_usage", "token_usage", "kv_cache_usage")
    usages = [v for d in dicts for k in usage_keys if (v := _num(d.get(k))) is not None]
    transports = {str(t) for d in dicts for k in ("transport", "kv_transport") if (t := d.get(k))}
    return Load(
        running=total("num_reqs", "running"),
        waiting=total("num_waiting_reqs", "waiting"),
        kv_usage=max(usages) if usages else None,
        transport=",".join(sorted(transports)) if transports else None,
    )


class FleetHttp:
    """One pooled async HTTP client for all of the controller's probes and registrations."""

    def __init__(self, *, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False, transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def healthy(self, url: str) -> bool:
        try:
            resp = await self._client.get(f"{url}/health")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def load(self, url: str) -> Load | None:
        try:
            resp = await self._client.get(f"{url}/get_load")
            if resp.status_code != 200:
                return None
            return parse_load(resp.json())
        except (httpx.HTTPError, ValueError):
            return None

    async def register(self, router_url: str, *, url: str, role: str, bootstrap_port: int | None) -> bool:
        body = {"url": url, "role": role, "bootstrap_port": bootstrap_port}
        try:
            resp = await self._client.post(f"{router_url}/workers", json=body)
        except httpx.HTTPError as exc:
            logger.warning("register %s with %s failed: %r", url, router_url, exc)
            return False
        if resp.status_code == 409:  # already known (e.g. registered before a controller restart)
            return True
        if resp.status_code >= 300:
            logger.warning("register %s: router answered %d %s", url, resp.status_code, resp.text[:200])
            return False
        return True

    async def deregister(self, router_url: str, *, url: str) -> bool:
        """True when the router no longer has ``url`` (removed now, or unknown: 404)."""
        try:
            resp = await self._client.request(
                "DELETE", f"{router_url}/workers", params={"url": url}, json={"url": url}
            )
        except httpx.HTTPError as exc:
            logger.warning("deregister %s from %s failed: %r", url, router_url, exc)
            return False
        return resp.status_code < 300 or resp.status_code == 404

    async def registered_urls(self, router_url: str) -> set[str] | None:
        """The worker URLs the router knows, or None when it cannot say."""
        try:
            resp = await self._client.get(f"{router_url}/workers")
            if resp.status_code != 200:
                return None
            return worker_urls(resp.json())
        except (httpx.HTTPError, ValueError):
            return None


def worker_urls(body: Any) -> set[str]:
    """URLs in a ``GET /workers`` answer: a list of entries, or a dict holding such lists
    (``workers``, ``prefill``, ``decode``, ...). Entries are URL strings or dicts with ``url``."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str) and node.startswith(("http://", "https://")):
            found.add(node.rstrip("/"))
        elif isinstance(node, dict):
            url = node.get("url")
            if isinstance(url, str):
                found.add(url.rstrip("/"))
            else:
                for value in node.values():
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body)
    return found
