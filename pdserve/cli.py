"""The ``pdserve`` command.

Subcommands live in their components' modules and are imported only when chosen, so
``pdserve router`` never imports torch. Each entry of :data:`COMMANDS` names a module exposing
``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (``name`` with dashes as
underscores). A :class:`~pdserve.errors.PdserveError` escaping a command becomes one
``pdserve: error: ...`` line on stderr and exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from pdserve import __version__
from pdserve.errors import PdserveError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init-model": ("pdserve.engine.cli", "write the tiny randomly initialised GLM-4-MoE checkpoint"),
    "generate": ("pdserve.engine.cli", "offline generation with the engine"),
    "worker": ("pdserve.decode_worker.cli", "run a prefill, decode or colocated (both) worker"),
    "router": ("pdserve.router.cli", "run the load- and cache-aware OpenAI router"),
    "up": ("pdserve.deploy.cli", "start the fleet on Ray (local by default)"),
    "status": ("pdserve.deploy.cli", "show every worker of a running fleet"),
    "scale": ("pdserve.deploy.cli", "change the number of prefill/decode workers live"),
    "down": ("pdserve.deploy.cli", "tear a detached fleet down"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("pdserve.engine.bench", "engine decode tokens/s and TTFT vs HF transformers"),
    "kv": ("pdserve.kvtransfer.bench", "KV transfer GB/s per transport vs memcpy / raw socket"),
    "serve": ("pdserve.router.bench", "serving latency and the router's own cost"),
}


def _fn(module: str, prefix: str, name: str) -> Callable[..., Any]:
    mod = importlib.import_module(module)
    return cast(Callable[..., Any], getattr(mod, f"{prefix}_{name.replace('-', '_')}"))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# global options that take a value: their value is not the command name
_VALUED_GLOBALS = frozenset({"--log-level"})


def _first_positional(argv: Sequence[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_GLOBALS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    parser.add_argument(
        "--log-level", default=os.environ.get("PDSERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _first_positional(argv)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            _fn(module, "add", f"{name}_arguments")(p)
    bench = sub.add_parser("bench", help="benchmarks (print ratios; last line is JSON)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench_chosen = None
    if chosen == "bench":
        rest = list(argv)
        bench_chosen = _first_positional(rest[rest.index("bench") + 1 :])
    for name, (module, help_) in BENCHMARKS.items():
        p = bsub.add_parser(name, help=help_)
        if name == bench_chosen:
            _fn(module, "add", "bench_arguments")(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    setup_logging(args.log_level)
    try:
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "bench":
            if args.bench is None:
                parser.parse_args(["bench", "--help"])
                return 2
            module = BENCHMARKS[args.bench][0]
            return int(_fn(module, "run", "bench")(args))
        module = COMMANDS[args.command][0]
        return int(_fn(module, "run", args.command)(args))
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
