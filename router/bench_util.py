"""Helpers for ``pdserve bench serve``: processes on 127.0.0.1, CPU accounting, a load generator.

Every process the benchmark starts binds 127.0.0.1 only; every load phase is bounded by a request
count and a wall-clock limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pdserve.errors import PdserveError
from pdserve.router.upstream import Addr, HttpClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    try:
        return subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def fake_worker_cmd(
    role: str, port: int, bootstrap_port: int | None, model_path: str, **opts: Any
) -> list[str]:
    cmd = [sys.executable, "-m", "pdserve.router.fake_worker", "--role", role, "--port", str(port),
           "--model-path", model_path]
    if bootstrap_port is not None:
        cmd += ["--bootstrap-port", str(bootstrap_port)]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Terminate a process we started (its own session), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


async def wait_ready(
    addr: Addr, path: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    client = HttpClient(connect_s=1.0, read_s=2.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise PdserveError(f"process for {addr} exited with {proc.returncode} before it was ready")
            try:
                await client.get_json(addr, path, 2.0)
                return
            except PdserveError:
                if time.monotonic() > deadline:
                    raise PdserveError(f"{addr[0]}:{addr[1]}{path} not ready after {timeout_s:g}s") from None
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for f in glob.glob(f"/proc/{p}/task/*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in Path(f).read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU time (user+system, all threads, child processes included) of a live process tree."""
    total_ns = 0
    for p in _tree(pid):
        for f in glob.glob(f"/proc/{p}/task/*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total_ns += int(Path(f).read_text().split()[0])
    if total_ns:
        return total_ns / 1e9
    ticks = os.sysconf("SC_CLK_TCK")
    secs = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            secs += (int(fields[11]) + int(fields[12])) / ticks
    return secs


def pct(values: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """p50/p90/p99/mean (scaled, default seconds -> ms), rounded."""
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {k: round(x * scale, 4) for k, x in
            (("p50", at(0.5)), ("p90", at(0.9)), ("p99", at(0.99)), ("mean", sum(v) / len(v)))}


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)


class Target:
    """Where requests go: a router (one address) or direct PD dispatch done by the client."""

    def __init__(self, name: str, addr: Addr, prefill: tuple[Addr, int] | None = None) -> None:
        self.name = name
        self.addr = addr
        self.prefill = prefill  # direct mode: (prefill addr, bootstrap port); addr is the decode worker


async def one_request(client: HttpClient, target: Target, body: dict[str, Any], run: Run) -> None:
    """Send one /generate and account for it (TTFT/ITL when streamed)."""
    t0 = time.perf_counter()
    stream = bool(body.get("stream"))
    prefill_task = None
    if target.prefill is not None:
        body = {**body, "bootstrap_host": target.prefill[0][0], "bootstrap_port": target.prefill[1],
                "bootstrap_room": random.getrandbits(63)}
    payload = orjson.dumps(body)
    try:
        if target.prefill is not None:
            prefill_task = asyncio.ensure_future(_drain(client, target.prefill[0], payload))
        resp = await client.request(target.addr, b"POST", b"/generate", payload)
        if resp.status != 200:
            await resp.read()
            run.errors += 1
            return
        last = t0
        first = True
        while (chunk := await resp.next_chunk()) is not None:
            now = time.perf_counter()
            if stream:
                n = chunk.count(b"data: {")
                if first and n:
                    run.ttft.append(now - t0)
                    first = False
                elif n:
                    run.itl.append((now - last) / n)
                run.tokens += n
            last = now
        if prefill_task is not None:
            await prefill_task
        run.latencies.append(time.perf_counter() - t0)
        if not stream:
            run.tokens += int(body.get("sampling_params", {}).get("max_new_tokens", 0))
    except PdserveError:
        run.errors += 1
        if prefill_task is not None:
            prefill_task.cancel()


async def _drain(client: HttpClient, addr: Addr, payload: bytes) -> None:
    resp = await client.request(addr, b"POST", b"/generate", payload)
    await resp.read()


async def closed_loop(
    target: Target, body: dict[str, Any], n: int, concurrency: int, time_limit_s: float
) -> Run:
    """``concurrency`` clients each sending back-to-back until ``n`` requests or the time limit."""
    client = HttpClient(connect_s=3.0, read_s=30.0, max_idle_per_addr=concurrency * 2)
    run = Run()
    left = n
    deadline = time.perf_counter() + time_limit_s

    async def loop() -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            await one_request(client, target, body, run)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        run.elapsed = time.perf_counter() - t0
        await client.aclose()
    return run


async def first_chunk_reused(addr: Addr, body: dict[str, Any], n: int) -> list[float]:
    """Time to the first streamed body chunk, sequentially on ONE keep-alive connection."""
    client = HttpClient(connect_s=3.0, read_s=30.0, max_idle_per_addr=1)
    payload = orjson.dumps({**body, "stream": True})
    out: list[float] = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await client.request(addr, b"POST", b"/generate", payload)
            chunk = await resp.next_chunk()
            out.append(time.perf_counter() - t0)
            while chunk is not None:
                chunk = await resp.next_chunk()
    finally:
        await client.aclose()
    return out
