"""Helpers of the e2e tier: the ``pdserve`` CLI as a subprocess, stand-in fleet configs, process
and socket checks on a local Ray head's session."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdserve.deploy.ray_cluster import session_members
from pdserve.deploy.server_actor import free_port

LOOPBACK = "127.0.0.1"


def session_pids(head_pid: int) -> list[int]:
    """Live processes of a local head's session (the head and everything Ray started)."""
    return session_members(head_pid)



def listening_addresses(pids: list[int]) -> dict[int, set[str]]:
    """pid -> the local addresses its TCP sockets listen on."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

    psutil = importlib.import_module("psutil")

    wanted = set(pids)
    out: dict[int, set[str]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid in wanted and conn.status == psutil.CONN_LISTEN:
            out.setdefault(conn.pid, set()).add(str(conn.laddr.ip))
    return out


def assert_loopback_only(head_pid: int) -> None:
    bad = {
        pid: addrs
        for pid, addrs in listening_addresses(session_pids(head_pid)).items()
        if addrs - {"127.0.0.1", "::ffff:127.0.0.1"}
    }
    assert not bad, f"Ray/fleet processes listening beyond loopback: {bad}"


class PdserveCli:
    """Runs ``python -m pdserve`` with a private state dir (bounded by a timeout)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "PDSERVE_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"}
        self.env["PDSERVE_LOG_LEVEL"] = "warning"

    def __call__(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "pdserve", *args],
            capture_output=True, text=True, env=self.env, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"pdserve {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "pdserve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, stdin=subprocess.DEVNULL,
        )

    def status(self, *extra: str) -> dict[str, Any]:
        proc = self("status", "--json", *extra, check=False, timeout=120)
        assert proc.returncode in (0, 1), proc.stderr
        return dict(json.loads(proc.stdout))


def standin_yaml(path: Path, *, router_port: int, name: str = "e2e", delay_s: float = 0.02) -> Path:
    """A fleet of stand-in apps (no model): fleet mechanics in seconds."""
    path.write_text(
        f"""\
fleet:
  name: {name}
  worker_app: {{factory: "pdserve.deploy.standin:build_worker_app", kwargs: {{delay_s: {delay_s}}}}}
  router_app: {{factory: "pdserve.deploy.standin:build_router_app"}}
  timeouts: {{health_interval_s: 0.3, drain_grace_s: 0.3, drain_s: 30, startup_s: 120, placement_s: 60}}
router:
  port: {router_port}
"""
    )
    return path


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


__all__ = ["LOOPBACK", "PdserveCli", "free_port", "standin_yaml", "wait_for"]
