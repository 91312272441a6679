"""``pdserve worker``: run a prefill, decode or colocated (``both``) worker with uvicorn.

    pdserve worker --role {prefill,decode,both} [--model DIR] --host H --port P
                   [--bootstrap-port B] [--transport shm|tcp|nccl|fake] [--served-model-name N]
                   [--num-blocks N] [--max-model-len N] [--config pdserve.yaml] ...

``--config`` reads a pdserve YAML file (its ``engine`` and ``kvtransfer`` sections) with
``PDSERVE_<SECTION>__<FIELD>`` environment overrides; flags win over both. The model and the
config are checked before the server starts, so a bad flag is one ``pdserve: error:`` line.
uvicorn runs on uvloop/httptools; SIGINT/SIGTERM stop accepting, let in-flight requests finish
(``--graceful-timeout`` seconds), then close the transfer service and the engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from types import FrameType
from typing import Any

from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run a pdserve worker: prefill, decode, or both (colocated)."
    parser.add_argument("--role", choices=["prefill", "decode", "both"], default="both")
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="GLM-4-MoE checkpoint directory (default: the embedded tiny default model)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--bootstrap-port",
        type=int,
        default=None,
        help="prefill: KV bootstrap port (default 8998); decode: the default peer port",
    )
    parser.add_argument(
        "--transport",
        choices=["shm", "tcp", "nccl", "fake"],
        default=None,
        help="KV transfer transport (default: the config's, tcp)",
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--config", default=None, metavar="YAML", help="pdserve config file")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    eng.add_argument("--device", default=None)
    eng.add_argument("--block-size", type=int, default=None)
    eng.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks")
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None)
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=int, default=None)
    eng.add_argument("--no-prefix-caching", action="store_true")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=None)
    lim.add_argument("--request-timeout", type=float, default=None, metavar="S")
    lim.add_argument("--first-output-timeout", type=float, default=None, metavar="S")
    lim.add_argument("--default-max-tokens", type=int, default=None)
    lim.add_argument("--reserve-wait", type=float, default=None, metavar="S")
    parser.add_argument(
        "--incremental-streaming-output",
        action="store_true",
        help="native /generate streams deltas (SGLang default: cumulative)",
    )
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="S")


def _set(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        target[key] = value


def worker_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`WorkerConfig` the flags (and ``--config`` + env) describe."""
    from pdserve.config import load_config
    from pdserve.decode_worker.config import WorkerConfig

    base = load_config(args.config, env=os.environ)
    engine = base.engine.model_dump()
    engine["show_progress"] = False
    for key in ("dtype", "device", "block_size", "num_blocks", "kv_cache_memory_gb", "max_model_len",
                "max_num_seqs", "max_num_batched_tokens"):  # fmt: skip
        _set(engine, key, getattr(args, key))
    if args.num_blocks is not None:
        engine["kv_cache_memory_gb"] = None
    if args.kv_cache_memory_gb is not None:
        engine["num_blocks"] = None
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False
    transfer = base.kvtransfer.model_dump()
    _set(transfer, "transport", args.transport)
    if args.device is not None and transfer.get("transport") != "nccl":
        transfer["device"] = "cpu"
    elif args.device is not None:
        transfer["device"] = args.device
    limits: dict[str, Any] = {}
    _set(limits, "max_body_bytes", args.max_body_bytes)
    _set(limits, "request_timeout_s", args.request_timeout)
    _set(limits, "first_output_timeout_s", args.first_output_timeout)
    _set(limits, "default_max_tokens", args.default_max_tokens)
    _set(limits, "reserve_wait_s", args.reserve_wait)
    fields: dict[str, Any] = {
        "role": args.role, "host": args.host, "port": args.port, "engine": engine, "kvtransfer": transfer,
        "limits": limits, "incremental_streaming_output": args.incremental_streaming_output,
    }  # fmt: skip
    _set(fields, "bootstrap_port", args.bootstrap_port)
    _set(fields, "served_model_name", args.served_model_name)
    _set(fields, "model", args.model)
    if args.model is not None:
        engine["model"] = None
    return WorkerConfig.build(**fields)


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Fail before loading the model when a port is taken (the bind itself happens later)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _terminated(signum: int, frame: FrameType | None) -> None:
    logger.info("worker stopped by signal %d after a graceful shutdown", signum)


def run_worker(args: argparse.Namespace) -> int:
    if args.graceful_timeout <= 0:
        raise ConfigError(f"--graceful-timeout must be positive, got {args.graceful_timeout}")
    config = worker_config_from_args(args).resolved()
    _check_port_free(config.host, config.port, "--port")
    if config.role == "prefill" and config.bootstrap_port:
        _check_port_free(config.host, config.bootstrap_port, "--bootstrap-port")

    import uvicorn  # heavy imports (torch) only once the flags are known to be usable

    from pdserve.decode_worker.server import build_app
    from pdserve.decode_worker.state import plan_kv_pool

    plan_kv_pool(config)  # a bad model dir or pool size fails here, as one error line
    app = build_app(config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", http="httptools", lifespan="on",
        access_log=False, log_config=None, server_header=False, date_header=False,
        timeout_keep_alive=60, timeout_graceful_shutdown=int(max(1.0, args.graceful_timeout)),
    )  # fmt: skip
    server = uvicorn.Server(uv_config)
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown; that shutdown is this
    # worker's normal way out, so it exits 0 (SIGINT still ends as an interrupt).
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ConfigError(
            f"the {config.role} worker did not start on {config.host}:{config.port} (see the log above)"
        )
    return 0
