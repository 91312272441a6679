"""``pdserve up | status | scale | down``: the fleet on Ray.

``up`` starts an embedded single-node Ray cluster on 127.0.0.1 unless ``--address`` (or
``fleet.ray.address``) names one to join (``--address auto`` after ``ray up``), checks that the
fleet fits, creates the fleet controller, shows progress until every worker is healthy and
registered, then serves until Ctrl-C/SIGTERM and tears everything down — or, with ``--detach``,
leaves the fleet (and the embedded cluster) running and returns. The fleet's whereabouts go to
``$PDSERVE_STATE_DIR`` (default ``~/.cache/pdserve``) so the other commands find it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pdserve.config import PdserveConfig, load_config
from pdserve.errors import ConfigError, PdserveError


def _state_dir() -> str:
    return os.environ.get("PDSERVE_STATE_DIR") or os.environ.get("PDSERVE_CACHE_DIR") or "~/.cache/pdserve"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster HOST:PORT or 'auto' (default: the saved one)")
    p.add_argument("--name", default="pdserve", help="fleet name (fleet.name)")
    p.add_argument("--namespace", default="pdserve", help="Ray namespace (fleet.ray.namespace)")
    p.add_argument("--state-dir", default=_state_dir(), help="where `pdserve up` saved the fleet's address")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="pdserve YAML (default: 1P + 1D, router :8000)")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto' after `ray up`)")
    p.add_argument("--detach", action="store_true", help="leave the fleet running and return")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for a healthy fleet")
    p.add_argument("--state-dir", default=_state_dir())


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    p.add_argument("--decode", type=int, default=None, help="decode workers wanted")
    p.add_argument("--no-wait", action="store_true", help="return before new workers are healthy")
    p.add_argument("--timeout", type=float, default=900.0)


def add_down_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--no-drain", action="store_true", help="do not wait for in-flight requests")
    p.add_argument("--timeout", type=float, default=300.0)


# -- up -------------------------------------------------------------------------------------------


def run_up(args: argparse.Namespace) -> int:
    # SIGTERM while the fleet starts or serves means the same as Ctrl-C: tear down, then exit.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _up(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    from pdserve.deploy import placement
    from pdserve.deploy.client import Fleet
    from pdserve.deploy.ray_cluster import FleetState, LocalRayHead, connect, is_loopback, state_path

    cfg = load_config(args.config, env=os.environ)
    fleet_cfg = cfg.fleet
    placement.check_model(cfg.engine.model)
    address = args.address or fleet_cfg.ray.address
    path = state_path(args.state_dir, fleet_cfg.name)
    _refuse_if_running(path)
    cpus = fleet_cfg.ray.num_cpus or placement.local_cluster_cpus(fleet_cfg)
    if address is None:
        # What can never fit on the one local node fails now, before anything starts.
        local = placement.local_node(cpus, fleet_cfg.ray.num_gpus)
        placement.check_fits(fleet_cfg, [local], gpu=cfg.uses_gpu)
    if cfg.engine.model is None and _runs_the_engine(cfg) and (address is None or is_loopback(address)):
        cfg = _with_default_model(cfg)  # built once here, not by every actor at the same time
    head: LocalRayHead | None = None
    if address is None:
        print(f"pdserve: starting a local Ray cluster on 127.0.0.1 ({cpus} CPUs)", file=sys.stderr)
        head = LocalRayHead.start(
            num_cpus=cpus, num_gpus=fleet_cfg.ray.num_gpus, object_store_mb=fleet_cfg.ray.object_store_mb,
            temp_dir=fleet_cfg.ray.temp_dir, timeout_s=fleet_cfg.ray.start_timeout_s,
        )
        address = head.address
    fleet: Fleet | None = None
    try:
        connect(address, namespace=fleet_cfg.ray.namespace, timeout_s=fleet_cfg.ray.start_timeout_s,
                log_to_driver=fleet_cfg.ray.log_to_driver)
        import ray

        strict = head is not None
        nodes = placement.alive_node_resources(ray.nodes())
        try:
            placement.check_fits(fleet_cfg, nodes, gpu=cfg.uses_gpu)
        except ConfigError as exc:
            if strict:
                raise
            print(f"pdserve: warning: {exc} (waiting for the autoscaler)", file=sys.stderr)
        fleet = Fleet.create(cfg, strict_resources=strict)
        FleetState(
            name=fleet_cfg.name, address=address, namespace=fleet_cfg.ray.namespace,
            router_url=_router_url(cfg), head_pid=head.pid if head else None,
            head_temp_dir=head.temp_dir if head else None,
            head_owns_temp_dir=head.owns_temp_dir if head else False, created_at=time.time(),
        ).save(path)
        timeout = args.timeout or fleet_cfg.timeouts.startup_s + fleet_cfg.timeouts.placement_s
        status = fleet.wait_ready(timeout, on_progress=_Progress())
    except BaseException as exc:
        if isinstance(exc, PdserveError | KeyboardInterrupt):
            why = str(exc) or "interrupted"
            print(f"pdserve: fleet did not come up ({why}); tearing down", file=sys.stderr)
        _teardown(fleet, head, path, fleet_cfg.name, fleet_cfg.ray.namespace, drain=False)
        raise
    print(f"pdserve: fleet {fleet_cfg.name!r} ready: router {status['router']['url']}", file=sys.stderr)
    print(_router_url(cfg) if status["router"]["url"] is None else status["router"]["url"], flush=True)
    if args.detach:
        import ray

        ray.shutdown()  # only this driver; the fleet and its cluster keep running
        print(f"pdserve: detached (stop it with `pdserve down --name {fleet_cfg.name}`)", file=sys.stderr)
        return 0
    print("pdserve: serving; Ctrl-C to stop", file=sys.stderr)
    _serve_until_stopped(fleet)
    print("pdserve: stopping the fleet", file=sys.stderr)
    _teardown(fleet, head, path, fleet_cfg.name, fleet_cfg.ray.namespace, drain=True)
    return 0


def _runs_the_engine(cfg: PdserveConfig) -> bool:
    """Whether the fleet's apps are pdserve's own worker/router (stand-ins need no model)."""
    own = ("pdserve.deploy.apps:", "pdserve.decode_worker.", "pdserve.router.")
    return any(cfg.fleet.app_for(role).factory.startswith(own) for role in ("prefill", "decode", "router"))


def _with_default_model(cfg: PdserveConfig) -> PdserveConfig:
    from pdserve.engine.default_model import ensure_default_model

    print("pdserve: using the tiny default model (built on first use)", file=sys.stderr)
    path = ensure_default_model()
    return cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"model": str(path)})})


def _router_url(cfg: PdserveConfig) -> str:
    host = "127.0.0.1" if cfg.router.host in {"0.0.0.0", "::"} else cfg.router.host
    return f"http://{host}:{cfg.router.port}"


def _refuse_if_running(path: Path) -> None:
    from pdserve.deploy.ray_cluster import FleetState

    state = FleetState.load(path)
    if state is None:
        return
    head = state.head()
    if head is not None and not head.alive():
        path.unlink(missing_ok=True)  # stale: its cluster is gone
        return
    raise ConfigError(
        f"fleet {state.name!r} is already up (Ray at {state.address}, router {state.router_url}); "
        f"`pdserve down --name {state.name}` first (state file {path})"
    )


class _Progress:
    """Prints one line per change (with new controller events) while the fleet starts."""

    def __init__(self) -> None:
        from pdserve.deploy.display import progress_line

        self._line = progress_line
        self._start = time.monotonic()
        self._last = ""
        self._events: set[str] = set()

    def __call__(self, status: dict[str, Any]) -> None:
        for event in status["events"]:
            if event not in self._events:
                self._events.add(event)
                print(f"  {event}", file=sys.stderr)
        line = self._line(status, time.monotonic() - self._start)
        if line.split("] ", 1)[1] != self._last:
            self._last = line.split("] ", 1)[1]
            print(line, file=sys.stderr, flush=True)


def _serve_until_stopped(fleet: Any) -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        last_ping = time.monotonic()
        while not stop.wait(0.5):
            if time.monotonic() - last_ping > 5.0:
                last_ping = time.monotonic()
                try:
                    fleet.ping()
                except Exception as exc:
                    print(f"pdserve: the fleet controller is gone ({exc}); exiting", file=sys.stderr)
                    return
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _teardown(fleet: Any, head: Any, path: Path, name: str, namespace: str, *, drain: bool) -> None:
    """Best effort, in order: fleet (drained), leftovers, driver, local head, state file. A
    second SIGTERM does not cut it short (a second Ctrl-C does)."""
    from pdserve.deploy.client import remove_leftovers

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        if fleet is not None:
            fleet.down(drain=drain, timeout_s=600.0)
    with contextlib.suppress(Exception):
        remove_leftovers(name, namespace)
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    if head is not None:
        head.stop()
    path.unlink(missing_ok=True)


# -- status / scale / down -----------------------------------------------------------------------


def _attach(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """Connect to the fleet's cluster; returns (Fleet | None, FleetState | None, state path)."""
    from pdserve.deploy.client import Fleet
    from pdserve.deploy.ray_cluster import FleetState, connect, state_path

    path = state_path(args.state_dir, args.name)
    state = FleetState.load(path)
    address = args.address or (state.address if state else None)
    if address is None:
        raise ConfigError(f"no fleet {args.name!r} known here (no {path}); pass --address")
    namespace = state.namespace if state and not args.address else args.namespace
    head = state.head() if state else None
    if head is not None and not head.alive():
        path.unlink(missing_ok=True)
        raise ConfigError(f"fleet {args.name!r}: its local Ray cluster at {address} is gone (state removed)")
    connect(address, namespace=namespace, timeout_s=60.0)
    return Fleet.find(args.name, namespace), state, path


def run_status(args: argparse.Namespace) -> int:
    from pdserve.deploy.display import status_table

    fleet, _, _ = _attach(args)
    if fleet is None:
        raise ConfigError(f"no fleet named {args.name!r} is running in that Ray cluster")
    status = fleet.status()
    print(json.dumps(status, indent=1) if args.json else status_table(status))
    return 0 if status["ready"] else 1


def run_scale(args: argparse.Namespace) -> int:
    from pdserve.deploy.display import status_table

    counts = {role: n for role, n in (("prefill", args.prefill), ("decode", args.decode)) if n is not None}
    if not counts:
        raise ConfigError("give --prefill N and/or --decode M", param="prefill")
    fleet, _, _ = _attach(args)
    if fleet is None:
        raise ConfigError(f"no fleet named {args.name!r} is running in that Ray cluster")
    status = fleet.scale(counts, wait=not args.no_wait, timeout_s=args.timeout)
    print(status_table(status))
    return 0 if status["ready"] or args.no_wait else 1


def run_down(args: argparse.Namespace) -> int:
    from pdserve.deploy.client import remove_leftovers

    fleet, state, path = _attach(args)
    summary: dict[str, Any] = {"removed": []}
    if fleet is not None:
        summary = fleet.down(drain=not args.no_drain, timeout_s=args.timeout)
    namespace = state.namespace if state else args.namespace
    leftovers = remove_leftovers(args.name, namespace)
    import ray

    ray.shutdown()
    head = state.head() if state else None
    if head is not None:
        head.stop()
    path.unlink(missing_ok=True)
    where = " and its local Ray cluster" if head is not None else ""
    extra = f"; also cleaned up {', '.join(leftovers)}" if leftovers else ""
    removed = len(summary.get("removed", []))
    print(f"pdserve: fleet {args.name!r} down ({removed} workers removed){where}{extra}", file=sys.stderr)
    return 0
