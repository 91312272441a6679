"""Bookkeeping for the fleet's actors: one :class:`ActorSlot` per router or worker.

A slot names its actor and placement group (``<fleet>-<role>-<index>``), remembers the server
info of the incarnation it last saw and whether that URL is registered with the router, and
carries the lifecycle state the controller drives:

    pending -> starting -> healthy <-> unhealthy
                              |  \\-> restarting (actor unreachable; Ray is restarting it)
                              \\-> draining -> (removed)
    any -> failed (could not start, or stayed unreachable past the startup timeout)

``busy`` marks a slot owned by a launch or a removal; the monitor loop leaves it alone.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.deploy.registry import Load

SLOT_NAME = re.compile(r"^(?P<fleet>[a-z0-9-]+)-(?P<role>prefill|decode)-(?P<index>\d+)$")


def slot_name(fleet: str, role: str, index: int | None = None) -> str:
    return f"{fleet}-{role}" if index is None else f"{fleet}-{role}-{index}"


@dataclass
class ActorSlot:
    name: str
    role: str
    index: int = 0
    actor: Any = None  # ray.actor.ActorHandle
    pg: Any = None  # ray.util.placement_group.PlacementGroup
    state: str = "pending"
    info: dict[str, Any] | None = None
    registered_url: str | None = None
    failures: int = 0
    unreachable_since: float | None = None
    restarts: int = 0
    ever_healthy: bool = False
    busy: bool = False
    error: str | None = None
    load: Load | None = None
    created_at: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        return None if self.info is None else str(self.info["url"])

    @property
    def bootstrap_port(self) -> int | None:
        if self.info is None or self.info.get("bootstrap_port") is None:
            return None
        return int(self.info["bootstrap_port"])

    def describe(self) -> dict[str, Any]:
        info = self.info or {}
        return {
            "name": self.name,
            "role": self.role,
            "index": self.index,
            "state": self.state,
            "url": info.get("url"),
            "bootstrap_port": info.get("bootstrap_port"),
            "pid": info.get("pid"),
            "node_ip": info.get("node_ip"),
            "incarnation": info.get("incarnation"),
            "registered": self.registered_url is not None,
            "restarts": self.restarts,
            "load": self.load.as_dict() if self.load else None,
            "error": self.error,
        }
