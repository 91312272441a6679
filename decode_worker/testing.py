"""Test helpers: real worker processes on 127.0.0.1 and a tiny PD dispatcher (no router).

- :func:`spawn_worker` starts ``python -m pdserve worker ...`` as a subprocess (its own process
  group, log to a file); :meth:`WorkerProcess.wait_ready` polls ``/health`` (bounded) and
  raises with the log's tail if the process died; ``stop()`` sends SIGTERM (graceful) and
  falls back to SIGKILL; ``kill()`` is the crash; :func:`stop_all` stops several in parallel.
- :func:`pd_post` / :func:`pd_stream`: what a PD router does for one request: add a fresh
  ``bootstrap_room`` and the prefill's host/port to the body and send it to both legs at once;
  the decode leg's response is the client's. The prefill leg's response is returned too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdserve.errors import PdserveError, WorkerError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    role: str
    port: int
    bootstrap_port: int | None
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise WorkerError(
                        f"{self.role} worker on port {self.port} exited with {self.proc.returncode}:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(0.2)
        raise WorkerError(
            f"{self.role} worker on port {self.port} not ready in {timeout_s} s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM without waiting (see :func:`stop_all`)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10.0)


def stop_all(workers: Sequence[WorkerProcess], timeout_s: float = 15.0) -> None:
    """Stop several workers at once: SIGTERM to all, then wait (SIGKILL stragglers)."""
    for w in workers:
        w.terminate()
    for w in workers:
        w.stop(timeout_s)


def spawn_worker(
    role: str,
    log_dir: Path,
    *,
    transport: str = "shm",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    bootstrap_port: int | None = None,
    log_level: str = "info",
) -> WorkerProcess:
    """Start a worker on 127.0.0.1 (free ports unless given); call ``wait_ready`` next."""
    port = port or free_port()
    if role == "prefill" and bootstrap_port is None:
        bootstrap_port = free_port()
    args = [
        sys.executable, "-m", "pdserve", f"--log-level={log_level}", "worker", "--role", role,
        "--host", HOST, "--port", str(port), "--transport", transport, *extra_args,
    ]  # fmt: skip
    if bootstrap_port is not None:
        args += ["--bootstrap-port", str(bootstrap_port)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip
    return WorkerProcess(role, port, bootstrap_port, proc, log_path, args)


def with_bootstrap(
    body: Mapping[str, Any], prefill: WorkerProcess, room: int | None = None
) -> dict[str, Any]:
    """``body`` plus the bootstrap triple naming ``prefill`` and a fresh (or given) room."""
    if prefill.bootstrap_port is None:
        raise PdserveError("the prefill worker has no bootstrap port")
    return {
        **body,
        "bootstrap_host": HOST,
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": random.getrandbits(63) if room is None else room,
    }


async def pd_post(
    client: httpx.AsyncClient,
    prefill: WorkerProcess,
    decode: WorkerProcess,
    path: str,
    body: Mapping[str, Any],
) -> tuple[httpx.Response, httpx.Response]:
    """Both legs of one non-streaming PD request: ``(decode response, prefill response)``."""
    full = with_bootstrap(body, prefill)
    p_leg = asyncio.ensure_future(client.post(prefill.url + path, json=full))
    try:
        d_resp = await client.post(decode.url + path, json=full)
    finally:
        p_resp = await p_leg
    return d_resp, p_resp


@contextlib.asynccontextmanager
async def pd_stream(
    client: httpx.AsyncClient,
    prefill: WorkerProcess,
    decode: WorkerProcess,
    path: str,
    body: Mapping[str, Any],
) -> AsyncIterator[tuple[httpx.Response, asyncio.Future[httpx.Response]]]:
    """Both legs of one streaming PD request: yields the open decode response and the prefill
    leg's future; leaving the block closes the decode stream (a client disconnect if early)."""
    full = with_bootstrap(body, prefill)
    p_leg = asyncio.ensure_future(client.post(prefill.url + path, json=full))
    try:
        async with client.stream("POST", decode.url + path, json=full) as d_resp:
            yield d_resp, p_leg
    finally:
        await asyncio.wait({p_leg}, timeout=30.0)
        if not p_leg.done():
            p_leg.cancel()
