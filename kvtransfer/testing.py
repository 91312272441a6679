"""Helpers for tests of the transfer service (and of workers that embed it).

* :func:`fast_config` — a :class:`TransferConfig` with short heartbeats and phase timeouts;
* :func:`tiny_layout`, :func:`fill_random`, :func:`same_pages` — small pools and bit-exact checks
  (compared as raw bytes: random bit patterns include NaNs); :func:`open_fds` for leak checks;
* :func:`service_pair` — a started prefill and decode service on 127.0.0.1, closed on exit;
* :class:`PeerProcess` — a :mod:`pdserve.kvtransfer.peerproc` subprocess with bounded waits for
  its events, ``kill()`` (SIGKILL) and ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.errors import TransferTimeoutError
from pdserve.kvtransfer.peerproc import fill_random
from pdserve.kvtransfer.prefill import PrefillTransferService


def open_fds() -> int:
    """Open file descriptors of this process (sockets, eventfds, shm maps' fds) for leak checks."""
    return len(os.listdir("/proc/self/fd"))


def fast_config(transport: str = "tcp", *, phase_timeout_s: float = 5.0, **overrides: Any) -> TransferConfig:
    """A config for tests: 0.1 s heartbeats (5 misses), ``phase_timeout_s`` for bootstrap, waiting
    and transfer, 1 s aborts; ``overrides`` win."""
    base: dict[str, Any] = {
        "transport": transport,
        "heartbeat_interval_s": 0.1,
        "heartbeat_misses": 5,
        "bootstrap_timeout_s": phase_timeout_s,
        "waiting_timeout_s": phase_timeout_s,
        "transfer_timeout_s": phase_timeout_s,
        "abort_timeout_s": 1.0,
    }
    return TransferConfig.model_validate({**base, **overrides})


def tiny_layout(**overrides: Any) -> KVLayout:
    fields: dict[str, Any] = {
        "num_layers": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "dtype": "bfloat16",
        "block_size": 4,
    }
    fields.update(overrides)
    return KVLayout(**fields)


def same_pages(src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]) -> bool:
    """Whether ``src[:, :, src_ids[i]]`` equals ``dst[:, :, dst_ids[i]]`` byte for byte, for all i."""
    a = src[:, :, list(src_ids)].contiguous().view(torch.uint8)
    b = dst[:, :, list(dst_ids)].contiguous().view(torch.uint8)
    return bool(torch.equal(a, b))


@contextlib.asynccontextmanager
async def service_pair(
    config: TransferConfig,
    layout: KVLayout,
    *,
    src_blocks: int = 64,
    dst_blocks: int = 96,
    seed: int = 0,
    decode_config: TransferConfig | None = None,
    decode_layout: KVLayout | None = None,
    nccl_lib: Any = None,
) -> AsyncIterator[tuple[PrefillTransferService, DecodeTransferService]]:
    """A started (prefill, decode) pair; the prefill pool is filled with random bytes."""
    storage = allocate_kv_storage(layout, src_blocks)
    fill_random(storage, seed)
    prefill = PrefillTransferService(config, layout, storage, registry=CollectorRegistry(), nccl_lib=nccl_lib)
    decode = DecodeTransferService(
        decode_config or config,
        decode_layout or layout,
        dst_blocks,
        registry=CollectorRegistry(),
        nccl_lib=nccl_lib,
    )
    await prefill.start()
    try:
        await decode.start()
        try:
            yield prefill, decode
        finally:
            await decode.close()
    finally:
        await prefill.close()


class PeerProcess:
    """A transfer peer in a separate process (``python -m pdserve.kvtransfer.peerproc``)."""

    def __init__(
        self,
        role: str,
        layout: KVLayout,
        num_blocks: int,
        config: TransferConfig,
        *,
        port: int = 0,
        advertise: str | None = None,
        prefault: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pdserve.kvtransfer.peerproc",
            "--role",
            role,
            "--layout",
            json.dumps(layout.to_dict()),
            "--num-blocks",
            str(num_blocks),
            "--config",
            config.model_dump_json(),
            "--port",
            str(port),
        ]
        if advertise is not None:
            cmd += ["--advertise", advertise]
        if prefault:
            cmd.append("--prefault")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._pending: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()
        self.ready = self.wait_event("ready", timeout=start_timeout)

    def _pump(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:  # pragma: no cover - always piped
            return
        for line in stdout:
            with contextlib.suppress(ValueError):
                self._events.put(json.loads(line))
        self._events.put({"event": "<eof>"})

    def _pump_err(self) -> None:
        stderr = self.proc.stderr
        if stderr is None:  # pragma: no cover - always piped
            return
        for line in stderr:
            self.stderr_lines.append(line)

    def send(self, cmd: str, **fields: Any) -> None:
        stdin = self.proc.stdin
        if stdin is None:  # pragma: no cover - always piped
            return
        stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        stdin.flush()

    def wait_event(self, name: str, *, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event ``name`` whose fields include ``match`` (others are kept for later)."""
        for i, ev in enumerate(self._pending):
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError(
                    f"peer {self.proc.pid}: no {name!r} event within {timeout} s; stderr tail: "
                    + "".join(self.stderr_lines[-20:]),
                    phase="setup",
                )
            try:
                ev = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("event") == "<eof>":
                raise TransferTimeoutError(
                    f"peer {self.proc.pid} exited before {name!r}: " + "".join(self.stderr_lines[-20:]),
                    phase="setup",
                )
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev
            self._pending.append(ev)

    async def wait_event_async(self, name: str, *, within: float, **match: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_event, name, timeout=within, **match)

    def kill(self) -> None:
        """SIGKILL the peer and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_streams()

    def _close_streams(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self, timeout: float = 20.0) -> dict[str, Any] | None:
        """Ask the peer to close cleanly; returns its ``closed`` event (None if it was dead)."""
        if self.proc.poll() is not None:
            self._close_streams()
            return None
        try:
            self.send("close")
            ev = self.wait_event("closed", timeout=timeout)
            self.proc.wait(timeout=timeout)
            return ev
        except (TransferTimeoutError, BrokenPipeError, subprocess.TimeoutExpired):
            self.kill()
            raise
        finally:
            self._close_streams()
