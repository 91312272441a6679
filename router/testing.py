"""Test helpers: fake worker processes and an in-process router, all on 127.0.0.1.

``FakeWorkerProcess`` runs ``python -m pdserve.router.fake_worker`` as a real process (killable);
``running_router`` serves a :class:`~pdserve.router.server.RouterApp` with uvicorn inside the
caller's event loop, so a test can look at its state while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pdserve.errors import PdserveError
from pdserve.router.bench_util import free_port, stop
from pdserve.router.config import RouterConfig
from pdserve.router.server import RouterApp

LOCAL = "127.0.0.1"


class FakeWorkerProcess:
    """One fake worker process (prefill, decode or both)."""

    def __init__(self, role: str, model_path: str | Path, log_dir: str | Path, **flags: Any) -> None:
        self.role = role
        self.port = free_port()
        self.bootstrap_port = free_port() if role == "prefill" else None
        self.url = f"http://{LOCAL}:{self.port}"
        cmd = [sys.executable, "-m", "pdserve.router.fake_worker", "--role", role, "--port", str(self.port),
               "--model-path", str(model_path)]
        if self.bootstrap_port is not None:
            cmd += ["--bootstrap-port", str(self.bootstrap_port)]
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.log = Path(log_dir) / f"fake-{role}-{self.port}.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise PdserveError(f"fake {self.role} worker exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise PdserveError(f"fake {self.role} worker on {self.port} not ready in {timeout_s}s")
            time.sleep(0.05)

    def spec(self) -> dict[str, Any]:
        s: dict[str, Any] = {"url": self.url, "role": self.role}
        if self.bootstrap_port is not None:
            s["bootstrap_port"] = self.bootstrap_port
        return s

    async def configure(self, **settings: Any) -> None:
        async with httpx.AsyncClient(timeout=5.0) as c:
            r = await c.post(f"{self.url}/fake/config", json=settings)
            r.raise_for_status()

    async def reset(self, **settings: Any) -> None:
        """Zero counters and restore the start-up settings, then apply ``settings``."""
        async with httpx.AsyncClient(timeout=5.0) as c:
            (await c.post(f"{self.url}/fake/reset", json=settings)).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5.0) as c:
            r = await c.get(f"{self.url}/fake/stats")
            r.raise_for_status()
            data: dict[str, Any] = r.json()
            return data

    async def wait_stats(self, timeout_s: float = 5.0, **expect: int) -> dict[str, Any]:
        """Poll until every named counter has at least the expected value (or fail with the last).

        ``ended=N`` means ``aborted + peer_failed >= N`` (the leg was freed either because its own
        client went away or because the other leg's did -- a race, both are correct)."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = await self.stats()
            st["ended"] = st["aborted"] + st["peer_failed"]
            settled = "ended" not in expect or not st["active"]
            if settled and all(st.get(k, 0) >= v for k, v in expect.items()):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role} worker stats {st} never reached {expect}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        stop(self.proc)


def start_workers(roles: Sequence[str], model_path: str | Path, log_dir: str | Path,
                  **flags: Any) -> list[FakeWorkerProcess]:
    """Start several fake workers at once (they boot in parallel), wait for all."""
    workers = [FakeWorkerProcess(r, model_path, log_dir, **flags) for r in roles]
    try:
        for w in workers:
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


@dataclass
class RouterHandle:
    app: RouterApp
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"


@asynccontextmanager
async def running_router(cfg: RouterConfig | None = None, *, workers: Sequence[FakeWorkerProcess] = (),
                         tokenizer: Any = None, **overrides: Any) -> AsyncIterator[RouterHandle]:
    """Serve a router on a free port in this event loop for the duration of the block."""
    port = free_port()
    if cfg is None:
        data: dict[str, Any] = {"workers": [w.spec() for w in workers], "port": port}
        data.setdefault("health", {"interval_s": 0.2, "timeout_s": 1.0})
        data.setdefault("load", {"interval_s": 0.2})
        data.setdefault("timeouts", {"connect_s": 1.0, "read_s": 10.0, "prefill_drain_s": 2.0})
        data.setdefault("retry", {"backoff_initial_s": 0.0})
        for k, v in overrides.items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        cfg = RouterConfig.build(**data)
    else:
        cfg = cfg.model_copy(update={"port": port})
    app = RouterApp(cfg, tokenizer=tokenizer)
    config = uvicorn.Config(app, host=LOCAL, port=port, lifespan="on", log_level="warning", access_log=False,
                            http="httptools")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 10.0
        while not server.started:
            if task.done():
                task.result()
                raise PdserveError("router exited during startup")
            if time.monotonic() > deadline:
                raise PdserveError("router did not start in 10s")
            await asyncio.sleep(0.02)
        yield RouterHandle(app, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10.0)
