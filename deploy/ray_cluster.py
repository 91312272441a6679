"""The Ray cluster a fleet runs on: an embedded local head, or an existing cluster to join.

Lifecycle of the embedded head (:class:`LocalRayHead`):

1. :meth:`LocalRayHead.start` runs ``ray start --head --block`` in a session of its own, every
   socket on 127.0.0.1 (node IP 127.0.0.1 and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which
   stops Ray from swapping loopback for the host's address; GCS, raylet, client server and
   agents then listen on loopback only), free ports for everything a second cluster on the same
   host could collide on, and waits (bounded) until it reports "Ray runtime started".
2. :func:`connect` attaches this process as a Ray driver (bounded too: Ray's own connect can
   wait minutes for an unreachable GCS).
3. :meth:`LocalRayHead.stop` sends SIGTERM to that ``ray start`` process, which stops what it
   started (GCS, raylet -> workers); whatever is still alive in its session after the timeout is
   killed by id. The temp dir is removed when we created it.

A fleet's whereabouts are kept in a small JSON state file (:class:`FleetState`) so that
``pdserve status/scale/down`` in another shell find the cluster and whether to stop its head.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.deploy.server_actor import free_port
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in {"127.0.0.1", "localhost", "::1"}


def _resolve_auto() -> str | None:
    """The HOST:PORT that ``address="auto"`` means on this host (RAY_ADDRESS, else the address
    Ray recorded for its newest local cluster), or None when nothing is recorded."""
    env_addr = os.environ.get("RAY_ADDRESS", "").strip()
    if env_addr and env_addr != "auto":
        return env_addr
    try:
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
    except Exception:  # Ray private API moved: keep the old behaviour
        logger.debug("cannot resolve Ray address 'auto'", exc_info=True)
        return None
    return str(found) if found else None


def pin_loopback() -> None:
    """Make this process's Ray keep 127.0.0.1 as the node address (must precede ``ray.init``).

    Ray reads the variable when ``ray._private.ray_constants`` is imported; if that already
    happened, the module constant is updated too."""
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 - not in Ray's type stubs


def session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


@dataclass
class LocalRayHead:
    """A single-node Ray cluster on loopback, owned by whoever started it."""

    address: str
    pid: int
    temp_dir: str
    owns_temp_dir: bool

    @classmethod
    def start(
        cls,
        *,
        num_cpus: int,
        num_gpus: int | None = None,
        object_store_mb: int = 256,
        temp_dir: str | None = None,
        timeout_s: float = 120.0,
    ) -> LocalRayHead:
        owns = temp_dir is None
        tdir = temp_dir or tempfile.mkdtemp(prefix="pdserve-ray-", dir="/tmp")
        Path(tdir).mkdir(parents=True, exist_ok=True)
        port = free_port(LOOPBACK)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--node-ip-address={LOOPBACK}", f"--port={port}", f"--num-cpus={num_cpus}",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tdir}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            f"--ray-client-server-port={free_port(LOOPBACK)}",
            f"--dashboard-agent-listen-port={free_port(LOOPBACK)}",
            f"--dashboard-agent-grpc-port={free_port(LOOPBACK)}",
            f"--metrics-export-port={free_port(LOOPBACK)}",
            f"--runtime-env-agent-port={free_port(LOOPBACK)}",
        ]
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        env = {**os.environ, _LOOPBACK_ENV: "0", "RAY_USAGE_STATS_ENABLED": "0"}
        log_path = Path(tdir) / "pdserve-ray-head.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        head = cls(address=f"{LOOPBACK}:{port}", pid=proc.pid, temp_dir=tdir, owns_temp_dir=owns)
        deadline = time.monotonic() + timeout_s
        while True:
            text = log_path.read_text(errors="replace")
            if "Ray runtime started" in text and _reachable(head.address, 1.0):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                head.stop(timeout_s=10.0)
                why = "exited" if proc.returncode is not None else f"not ready within {timeout_s:.0f} s"
                tail = "\n".join(text.strip().splitlines()[-8:])
                raise ConfigError(f"the local Ray head {why}:\n{tail}")
            time.sleep(0.2)
        # Reap the child in the background so it never lingers as a zombie.
        threading.Thread(target=proc.wait, name="ray-head-reaper", daemon=True).start()
        logger.info("local Ray head at %s (pid %d, logs in %s)", head.address, head.pid, tdir)
        return head

    def alive(self) -> bool:
        return bool(session_members(self.pid))

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the head and everything in its session; True when nothing was left to kill."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while session_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_members(self.pid)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            logger.warning("killed %d Ray processes that outlived SIGTERM: %s", len(left), left)
        if self.owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return not left


def _reachable(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect(address: str, *, namespace: str, timeout_s: float = 60.0, log_to_driver: bool = False) -> None:
    """Attach this process to the cluster at ``address`` ("auto" = the one on this host)."""
    if address != "auto":
        if ":" not in address:
            raise ConfigError(f"--address {address!r}: expected HOST:PORT or 'auto'", param="address")
        if not _reachable(address, min(timeout_s, 5.0)):
            raise ConfigError(f"no Ray cluster answers at {address}", param="address")
    if address == "auto":
        # Pin loopback only when the local cluster itself is on loopback (a `ray up` head
        # registers its real IP; pinning a driver there to 127.0.0.1 would orphan it).
        address = _resolve_auto() or address
    if address == "auto" or is_loopback(address):
        pin_loopback()
    # Ray's C++ failure-signal handler would turn our SIGTERM (= tear down, like Ctrl-C) into an
    # abort with a stack dump in the middle of the teardown. Only this driver process is affected.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "address": address, "namespace": namespace, "log_to_driver": log_to_driver,
        "logging_level": logging.WARNING, "configure_logging": False,
    }
    if is_loopback(address):
        kwargs["_node_ip_address"] = LOOPBACK
    errors: list[BaseException] = []

    def _init() -> None:
        # Ray warns that it cannot install its SIGTERM handler off the main thread; we handle
        # SIGTERM ourselves, so keep that line out of the operator's terminal.
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.ERROR)
        try:
            ray.init(**kwargs)
        except BaseException as exc:
            errors.append(exc)
        finally:
            ray_logger.setLevel(level)

    thread = threading.Thread(target=_init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ConfigError(f"connecting to the Ray cluster at {address} took over {timeout_s:.0f} s")
    if errors:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {errors[0]}") from errors[0]


@dataclass
class FleetState:
    """Where a fleet runs, saved by ``pdserve up`` for the other commands."""

    name: str
    address: str
    namespace: str
    router_url: str
    head_pid: int | None = None
    head_temp_dir: str | None = None
    head_owns_temp_dir: bool = False
    created_at: float = 0.0

    def head(self) -> LocalRayHead | None:
        if self.head_pid is None or self.head_temp_dir is None:
            return None
        return LocalRayHead(self.address, self.head_pid, self.head_temp_dir, self.head_owns_temp_dir)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FleetState | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"fleet state file {path} is unreadable ({exc}); delete it") from exc


def state_path(state_dir: str | os.PathLike[str], fleet: str) -> Path:
    return Path(state_dir).expanduser() / f"fleet-{fleet}.json"
