"""The embedded default model: a tiny, randomly initialised GLM-4-MoE checkpoint in HF format.

``init_model(out_dir, seed)`` writes, deterministically for a seed (byte-identical files):

1. a byte-level BPE tokenizer trained locally (:mod:`pdserve.engine.bpe_training`):
   ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
   ``chat_template.jinja`` (GLM-4.5 format, :file:`engine/chat_template.jinja`);
2. ``config.json`` (HF ``glm4_moe``: 3 layers, the first dense, then MoE with 8 routed experts
   top-2 in 2 groups, 1 shared expert, one MTP layer) and ``generation_config.json``;
3. seeded random weights (:mod:`pdserve.engine.random_weights`) in two safetensors shards with
   ``model.safetensors.index.json``, MTP layer included;
4. last, ``pdserve_model.json``: the manifest (file sizes and SHA-256) that marks it complete.

``ensure_default_model()`` keeps one copy per seed under ``<cache>/models/tiny-glm4-moe-s<seed>``
(``<cache>`` = ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``): built in a temporary sibling
directory and renamed into place, so concurrent processes never see a partial model (the loser
of a race discards its copy); an existing directory is reused only if its manifest checks out.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pdserve.engine.bpe_training import DEFAULT_VOCAB_SIZE, GLM_CONTROL_TOKENS, train_bpe_tokenizer
from pdserve.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "pdserve_model.json"
NUM_SHARDS = 2
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
MODEL_MAX_LENGTH = 8192


def default_model_name(seed: int = 0) -> str:
    return f"tiny-glm4-moe-s{seed}"


def chat_template_source() -> str:
    """The GLM-4.5-format chat template shipped with pdserve."""
    return importlib.resources.files("pdserve.engine").joinpath("chat_template.jinja").read_text("utf-8")


def default_config(vocab_size: int, eos_token_ids: list[int], pad_token_id: int) -> dict[str, Any]:
    """HF ``config.json`` of the tiny model (``vocab_size`` is rounded up to a multiple of 64)."""
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": list(eos_token_ids),
        "pad_token_id": pad_token_id,
        "first_k_dense_replace": 1,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "moe_intermediate_size": 64,
        "n_group": 2,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "routed_scaling_factor": 2.5,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_qk_norm": False,
        "vocab_size": -(-vocab_size // 64) * 64,
    }


def validate_config(cfg: Mapping[str, Any], tokenizer_vocab: int) -> None:
    """Cross-field checks on a (possibly overridden) config; raises ConfigError."""
    def need(ok: bool, why: str) -> None:
        if not ok:
            raise ConfigError(f"invalid tiny-model config: {why}")

    ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "vocab_size", "max_position_embeddings")
    for key in ints:
        value = cfg.get(key)
        need(isinstance(value, int) and value > 0, f"{key} must be a positive int, got {value!r}")
    need(cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0,
         "num_attention_heads must be a multiple of num_key_value_heads")
    need(cfg["n_routed_experts"] % cfg["n_group"] == 0, "n_routed_experts must be a multiple of n_group")
    need(cfg["topk_group"] <= cfg["n_group"], "topk_group must be <= n_group")
    per_group = cfg["n_routed_experts"] // cfg["n_group"]
    need(cfg["num_experts_per_tok"] <= per_group * cfg["topk_group"],
         "num_experts_per_tok exceeds the experts in the selected groups")
    need(0 <= cfg["first_k_dense_replace"] <= cfg["num_hidden_layers"], "first_k_dense_replace out of range")
    need(cfg["vocab_size"] >= tokenizer_vocab,
         f"vocab_size must cover the tokenizer's {tokenizer_vocab} tokens")
    need(cfg.get("architectures") == ["Glm4MoeForCausalLM"] and cfg.get("model_type") == "glm4_moe",
         "the default model must be Glm4MoeForCausalLM / glm4_moe")


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _tokenizer_config(template: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": list(GLM_CONTROL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "chat_template": template,
    }


def init_model(
    out_dir: str | os.PathLike[str], seed: int = 0, *, config_overrides: Mapping[str, Any] | None = None
) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created if needed; files are overwritten)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create model directory {out}: {exc}") from exc
    tok = train_bpe_tokenizer(DEFAULT_VOCAB_SIZE)
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    stop_ids = [tok.token_to_id(t) for t in STOP_TOKENS]
    pad_id = tok.token_to_id("<|endoftext|>")
    if pad_id is None or any(i is None for i in stop_ids):
        raise ConfigError("trained tokenizer lacks GLM stop tokens")  # unreachable by construction
    cfg = default_config(tok_vocab, [int(i) for i in stop_ids if i is not None], pad_id)
    unknown = sorted(set(config_overrides or {}) - set(cfg) - {"dtype", "rope_parameters", "bos_token_id"})
    if unknown:
        logger.warning("config_overrides adds keys the tiny model does not use: %s", unknown)
    cfg.update(dict(config_overrides or {}))
    validate_config(cfg, tok_vocab)
    template = chat_template_source()
    files: dict[str, bytes] = {
        "tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
        "chat_template.jinja": template.encode("utf-8"),
    }
    try:
        for name, data in files.items():
            _write_bytes(out / name, data)
        _write_json(out / "tokenizer_config.json", _tokenizer_config(template))
        _write_json(out / "special_tokens_map.json", {
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": list(GLM_CONTROL_TOKENS),
        })
        _write_json(out / "config.json", cfg)
        _write_json(out / "generation_config.json", {
            "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"],
        })
        shard_names = _write_weights(out, cfg, seed)
        _write_manifest(out, seed, ["tokenizer.json", "chat_template.jinja", "tokenizer_config.json",
                                    "special_tokens_map.json", "config.json", "generation_config.json",
                                    "model.safetensors.index.json", *shard_names])
    except OSError as exc:
        raise ConfigError(f"cannot write the model into {out}: {exc}") from exc
    logger.info("wrote tiny GLM-4-MoE checkpoint (seed %d) to %s", seed, out)
    return out


def _write_weights(out: Path, cfg: Mapping[str, Any], seed: int) -> list[str]:
    from safetensors.torch import save  # torch only here: `ensure_default_model` reuse stays light

    from pdserve.engine.random_weights import random_weights

    tensors = random_weights(cfg, seed)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    total = sum(sizes.values())
    names = [f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors" for i in range(NUM_SHARDS)]
    groups: list[dict[str, Any]] = [{} for _ in range(NUM_SHARDS)]
    acc = 0
    for name, tensor in tensors.items():  # generation order: embeddings/early layers first
        shard = min(NUM_SHARDS - 1, acc * NUM_SHARDS // total)
        groups[shard][name] = tensor
        acc += sizes[name]
    weight_map: dict[str, str] = {}
    for file, group in zip(names, groups, strict=True):
        _write_bytes(out / file, save(group, metadata={"format": "pt"}))
        weight_map.update({n: file for n in group})
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(out: Path, seed: int, files: list[str]) -> None:
    _write_json(out / MANIFEST_FILE, {
        "format_version": FORMAT_VERSION,
        "generator": "pdserve.engine.default_model.init_model",
        "seed": seed,
        "corpus_python": platform.python_version(),
        "files": {f: {"size": (out / f).stat().st_size, "sha256": _sha256(out / f)} for f in sorted(files)},
    })


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest if ``model_dir`` holds a complete model of this format version, else None."""
    root = Path(model_dir)
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text("utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        for name, meta in manifest["files"].items():
            if (root / name).stat().st_size != meta["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(manifest)


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A digest of the checkpoint's files (equal on every machine that built the same model)."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ModelLoadError(f"{model_dir} is not a complete pdserve-generated model")
    digest = json.dumps({n: m["sha256"] for n, m in sorted(manifest["files"].items())}, sort_keys=True)
    return hashlib.sha256(digest.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve"


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """Path of the default model, creating it atomically on first use."""
    models = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"
    final = models / default_model_name(seed)
    if read_manifest(final) is not None:
        return final
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the model cache {models}: {exc}") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=models))
    try:
        init_model(tmp, seed)
        for _ in range(3):
            try:
                os.rename(tmp, final)
                logger.info("default model ready at %s", final)
                return final
            except OSError:
                if read_manifest(final) is not None:
                    return final  # another process won the race
                _move_aside(final)
        raise ConfigError(f"could not install the default model at {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_aside(path: Path) -> None:
    """Replace a stale/incomplete model directory: rename it away, then delete it."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".stale-{path.name}-", dir=path.parent))
    try:
        os.rename(path, trash / path.name)
        logger.warning("replaced an incomplete or outdated model directory at %s", path)
    except OSError:
        pass  # someone else moved or replaced it; the caller re-checks
    finally:
        shutil.rmtree(trash, ignore_errors=True)
