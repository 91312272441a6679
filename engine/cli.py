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
        raise ConfigError(
            f"{out} is not empty ({len(existing)} entries); pass --force to write into it anyway"
        )

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


# --------------------------------------------------------------------------- generate
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Offline generation with the engine: the prompts run as one continuous batch. With --json, one "
        "JSON object per prompt per line (output_ids, text, finish_reason, ...)."
    )
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="GLM-4-MoE checkpoint directory (default: the embedded tiny default model)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text (repeatable)")
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="comma-separated prompt token ids, e.g. 1,2,3 (repeatable)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each --prompt as a user message and apply the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate at most (default 16)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = disabled")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed (reproducible)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="with --json: each token's logprob and the top K alternatives")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context limit (default: the model's)")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV pool size in blocks (default: derived)")


def _parse_ids(text: str) -> list[int]:
    from pdserve.errors import InvalidRequestError

    try:
        ids = [int(tok) for tok in text.replace(" ", "").split(",") if tok != ""]
    except ValueError:
        raise InvalidRequestError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InvalidRequestError("--prompt-ids is empty")
    return ids


def run_generate(args: argparse.Namespace) -> int:
    import json

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.errors import InvalidRequestError

    if args.chat and args.prompt_ids:
        raise InvalidRequestError("--chat needs --prompt (text), not --prompt-ids")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=list(args.stop), ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    texts: list[str | None] = list(args.prompt) if args.prompt else [None] * len(args.prompt_ids)
    id_prompts = [_parse_ids(t) for t in args.prompt_ids] if args.prompt_ids else []
    config = EngineConfig.build(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        num_blocks=args.num_blocks, max_num_seqs=min(64, len(texts)), seed=args.seed or 0,
        show_progress=False,
    )

    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.tokenizer import Tokenizer

    engine = LLMEngine(config)
    tok = engine.tokenizer
    if not isinstance(tok, Tokenizer):  # LLMEngine always loads the real one here
        raise InvalidRequestError("the engine has no text tokenizer")
    if args.prompt:
        if args.chat:
            id_prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in args.prompt]
        else:
            id_prompts = [tok.encode(t) for t in args.prompt]
    done = engine.generate(id_prompts, params)
    for i, (text, ids, c) in enumerate(zip(texts, id_prompts, done, strict=True)):
        if args.json:
            record: dict[str, object] = {
                "index": i, "prompt": text, "prompt_ids": ids, "output_ids": c.output_ids, "text": c.text,
                "finish_reason": c.finish_reason, "matched_stop": c.matched_stop,
                "num_prompt_tokens": len(ids), "num_output_tokens": len(c.output_ids),
                "num_cached_tokens": c.num_cached_tokens,
            }
            if args.logprobs is not None:
                record["logprobs"] = [
                    {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                    for lp in c.logprobs
                ]
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(c.text, flush=True)
    return 0
