"""Engine subcommands of ``pdserve`` (dispatch contract: see :mod:`pdserve.cli`).

Each command is a pair ``add_<name>_arguments(parser)`` / ``run_<name>(args) -> int``; heavy
imports happen inside ``run_*`` so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- init-model
def add_init_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the tiny randomly initialised GLM-4-MoE checkpoint (HF format: config.json, sharded "
        "safetensors with an MTP layer, a locally trained byte-level BPE tokenizer and the GLM-4.5 "
        "chat template) into DIR. The same seed always gives byte-identical files."
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="write into DIR even if it is not empty (pdserve's files are overwritten)")


def run_init_model(args: argparse.Namespace) -> int:
    out: Path = args.dir
    if args.seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not args.force:
        raise ConfigError(f"{out} is not empty ({len(existing)} entries); pass --force to write into it anyway")

    from pdserve.engine.default_model import MANIFEST_FILE, init_model, read_manifest

    init_model(out, args.seed)
    manifest = read_manifest(out)
    if manifest is None:
        raise ConfigError(f"the model written to {out} failed its completeness check")
    ours = set(manifest["files"]) | {MANIFEST_FILE}
    foreign = [name for name in existing if name not in ours]
    if foreign:
        logger.warning("left %d files in %s that are not part of the model: %s",
                       len(foreign), out, ", ".join(foreign[:10]))
    print(out.resolve())
    return 0
