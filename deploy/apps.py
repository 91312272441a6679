"""The fleet's default app factories: the real worker and the real router.

Both follow the fleet's factory convention, ``factory(host=, port=, role=, [bootstrap_port=,]
config=, **kwargs)`` with ``config`` the whole pdserve config as a JSON-able dict:

* :func:`build_worker_app` -> ``pdserve.decode_worker.server.build_worker_app`` (which takes the
  ``engine`` and ``kvtransfer`` sections), adding the router's ``served_model_name`` so workers
  and router advertise the same name, and turning the engine's progress bars off (actor logs).
* :func:`build_router_app` -> the router's ASGI app for the ``router`` section, bound where the
  actor listens, with ``model_path`` defaulting to the workers' model (``engine.model``, else
  the tiny default model) so its tokenizer is loaded before it reports healthy. Workers are not
  listed in it: the fleet controller registers them.
"""

from __future__ import annotations

import copy
from typing import Any


def build_worker_app(
    *,
    host: str,
    port: int,
    role: str,
    bootstrap_port: int | None = None,
    config: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    from pdserve.decode_worker.server import build_worker_app as worker_app

    cfg = copy.deepcopy(config) if config is not None else None
    if cfg is not None:
        cfg.setdefault("engine", {})["show_progress"] = False
        served = (cfg.get("router") or {}).get("served_model_name")
        if served and "served_model_name" not in overrides:
            overrides["served_model_name"] = served
    return worker_app(host=host, port=port, role=role, bootstrap_port=bootstrap_port, config=cfg, **overrides)


def build_router_app(
    *, host: str, port: int, role: str = "router", config: dict[str, Any] | None = None, **overrides: Any
) -> Any:
    from pdserve.config import parse_config
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import RouterApp

    full = parse_config(config or {}, source="fleet")
    fields = {**full.router.model_dump(), **overrides, "host": host, "port": port}
    if fields.get("model_path") is None:
        # The workers' model: the router tokenises and applies the chat template itself, so it
        # must have the tokenizer before it reports healthy (rather than discover it later).
        fields["model_path"] = full.engine.model or str(_default_model())
    return RouterApp(RouterConfig.build(**fields))


def _default_model() -> Any:
    from pdserve.engine.default_model import ensure_default_model

    return ensure_default_model()
