"""``pdserve router``: the load- and cache-aware PD router (sglang-router's command-line shape).

    pdserve router --prefill http://P:30000 8998 --decode http://D:30001 [--worker http://C:30002]
                   [--host 127.0.0.1] [--port 8000] [--config router.yaml] [--model DIR]
                   [--served-model-name NAME] [--policy cache_aware] [--decode-policy load] ...

Flags override the YAML file (``--config``); workers from both are merged.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pdserve.errors import ConfigError
from pdserve.router.config import RouterConfig

logger = logging.getLogger(__name__)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workers")
    w.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help="a prefill worker and optionally its bootstrap port (default 8998); repeatable")
    w.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode worker; repeatable")
    w.add_argument("--worker", action="append", default=[], metavar="URL",
                   help="a colocated (prefill+decode) worker; repeatable")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="router config file")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="model dir for the tokenizer/chat template")
    parser.add_argument("--served-model-name", default=None, metavar="NAME")
    p = parser.add_argument_group("routing")
    p.add_argument("--policy", "--prefill-policy", dest="policy",
                   choices=["cache_aware", "load", "round_robin", "random"], default=None,
                   help="prefill worker policy (default cache_aware)")
    p.add_argument("--decode-policy", choices=["load", "round_robin", "random"], default=None,
                   help="decode worker policy (default load)")
    p.add_argument("--local-prefill-threshold", type=int, default=None, metavar="TOKENS",
                   help="prefill on the decode worker when fewer uncached prompt tokens than this (0: off)")
    p.add_argument("--max-retries", type=int, default=None, help="retries on a new pair before first token")
    p.add_argument("--max-inflight", type=int, default=None, help="answer 429 beyond this many requests")
    p.add_argument("--read-timeout", type=float, default=None, metavar="S", help="upstream read timeout")
    p.add_argument("--health-interval", type=float, default=None, metavar="S", help="health check period")
    p.add_argument("--no-health-check", action="store_true", help="disable periodic health checks")


def _workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in args.prefill:
        if len(item) > 2:
            raise ConfigError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(item)}")
        spec: dict[str, Any] = {"url": item[0], "role": "prefill"}
        if len(item) == 2 and item[1].lower() != "none":
            try:
                spec["bootstrap_port"] = int(item[1])
            except ValueError:
                raise ConfigError(
                    f"--prefill {item[0]}: bootstrap port {item[1]!r} is not a number"
                ) from None
        out.append(spec)
    out += [{"url": u, "role": "decode"} for u in args.decode]
    out += [{"url": u, "role": "both"} for u in args.worker]
    return out


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    base: dict[str, Any] = {}
    if args.config:
        base = RouterConfig.from_yaml(args.config).model_dump(exclude_unset=True)
    workers = list(base.get("workers", ())) + _workers(args)
    for key, value in (("host", args.host), ("port", args.port), ("model_path", args.model),
                       ("served_model_name", args.served_model_name),
                       ("max_inflight_requests", args.max_inflight)):
        if value is not None:
            base[key] = value
    policy = dict(base.get("policy", {}))
    for key, value in (("prefill", args.policy), ("decode", args.decode_policy),
                       ("local_prefill_threshold", args.local_prefill_threshold)):
        if value is not None:
            policy[key] = value
    retry = dict(base.get("retry", {}))
    if args.max_retries is not None:
        retry["max_retries"] = args.max_retries
    timeouts = dict(base.get("timeouts", {}))
    if args.read_timeout is not None:
        timeouts["read_s"] = args.read_timeout
    health = dict(base.get("health", {}))
    if args.health_interval is not None:
        health["interval_s"] = args.health_interval
    if args.no_health_check:
        health["enabled"] = False
    base.update(workers=workers, policy=policy, retry=retry, timeouts=timeouts, health=health)
    return RouterConfig.build(**base)


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.router.server import RouterApp

    cfg = config_from_args(args)
    if not cfg.workers:
        logger.warning("no workers configured; register them with POST /workers")
    tokenizer = None
    if cfg.model_path is not None:  # fail here, with one clear line, if --model is unusable
        from pdserve.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(cfg.model_path)
    app = RouterApp(cfg, freeze_gc=True, tokenizer=tokenizer)
    level = logging.getLogger().getEffectiveLevel()
    uvicorn.run(
        app, host=cfg.host, port=cfg.port, loop="uvloop", http="httptools", access_log=False,
        server_header=False, date_header=False, log_level=logging.getLevelName(level).lower(),
        timeout_keep_alive=60, proxy_headers=False,
    )
    return 0
