"""The GLM-4-MoE architecture description, parsed from a Hugging Face ``config.json``.

Semantics and defaults follow ``transformers``' ``Glm4MoeConfig`` (model_type ``glm4_moe``):

* RoPE: newer configs carry ``rope_parameters`` (``rope_theta``, ``partial_rotary_factor``,
  ``rope_type``); older ones (the GLM-4.5/4.6 checkpoints on the hub) put ``rope_theta`` and
  ``partial_rotary_factor`` at top level and may carry ``rope_scaling``. Priority, as in HF:
  values inside the dict, then the top-level keys, then the defaults (theta 10000, factor 0.5).
  Only ``rope_type: default`` is supported.
* ``head_dim`` defaults to ``hidden_size // num_attention_heads``; the rotary part of each head is
  ``int(head_dim * partial_rotary_factor)`` dims (the rest passes through).
* ``eos_token_id`` may be an int or a list; it is exposed as the tuple ``eos_token_ids``.
* ``num_nextn_predict_layers`` (alias ``num_mtp_layers``) counts the MTP layers a checkpoint may
  store after the last decoder layer; HF itself never builds them.

Anything unusable (missing or garbled file, wrong model type/architecture, inconsistent sizes)
raises :class:`pdserve.errors.ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import ModelLoadError

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"

_INT_FIELDS: dict[str, int] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "num_hidden_layers": 46,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 1408,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 128,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 1,
}
_FLOAT_FIELDS: dict[str, float] = {"rms_norm_eps": 1e-5, "routed_scaling_factor": 1.0}
_BOOL_FIELDS: dict[str, bool] = {
    "tie_word_embeddings": False,
    "attention_bias": False,
    "norm_topk_prob": True,
    "use_qk_norm": False,
}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_PARTIAL_ROTARY = 0.5


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    moe_intermediate_size: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_routed_experts: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    num_nextn_predict_layers: int
    rms_norm_eps: float
    routed_scaling_factor: float
    tie_word_embeddings: bool
    attention_bias: bool
    norm_topk_prob: bool
    use_qk_norm: bool
    rope_theta: float = _DEFAULT_ROPE_THETA
    partial_rotary_factor: float = _DEFAULT_PARTIAL_ROTARY
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- derived
    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that rotate (HF: ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["architectures"] = list(self.architectures)
        return data

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        model_dir = Path(path)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist", param="model")
        cfg_path = model_dir / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"no config.json in model directory {str(model_dir)!r}", param="model")
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {exc}", param="model") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{cfg_path} must hold a JSON object", param="model")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}: pdserve serves {MODEL_TYPE!r} models", param="model"
            )
        archs = data.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
                raise ModelLoadError(f"config 'architectures' must be a list of strings, got {archs!r}")
            if ARCHITECTURE not in archs:
                raise ModelLoadError(f"unsupported architectures {archs!r}: expected {ARCHITECTURE!r}")
        quant = data.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise ModelLoadError(
                f"quantized checkpoints ({method}) are not supported: use a bf16/fp32 checkpoint"
            )
        values: dict[str, Any] = {}
        for name, default in _INT_FIELDS.items():
            key = "num_mtp_layers" if name == "num_nextn_predict_layers" and name not in data else name
            values[name] = _get_int(data, key, default)
        for fname, fdefault in _FLOAT_FIELDS.items():
            values[fname] = _get_float(data, fname, fdefault)
        for bname, bdefault in _BOOL_FIELDS.items():
            values[bname] = _get_bool(data, bname, bdefault)
        head_dim_raw = data.get("head_dim")
        if head_dim_raw is None:
            if values["num_attention_heads"] <= 0:
                raise ModelLoadError("config num_attention_heads must be positive")
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        else:
            values["head_dim"] = _get_int(data, "head_dim", 0)
        values["rope_theta"], values["partial_rotary_factor"] = _parse_rope(data)
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
        values["hidden_act"] = act
        values["eos_token_ids"] = _parse_eos(data.get("eos_token_id"))
        values["bos_token_id"] = _get_opt_int(data, "bos_token_id")
        values["pad_token_id"] = _get_opt_int(data, "pad_token_id")
        dtype = data.get("dtype", data.get("torch_dtype"))
        values["torch_dtype"] = dtype if isinstance(dtype, str) else None
        values["architectures"] = tuple(archs) if archs else (ARCHITECTURE,)
        known = set(values) | {"model_type", "eos_token_id", "dtype", "torch_dtype", "num_mtp_layers"}
        values["extra"] = {k: v for k, v in data.items() if k not in known}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Cross-field checks; raises :class:`ModelLoadError` naming the offending field."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "moe_intermediate_size",
            "num_experts_per_tok",
            "n_routed_experts",
            "n_group",
            "topk_group",
        ):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config {name} must be positive, got {getattr(self, name)}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ModelLoadError(f"config {name} must be >= 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ModelLoadError(
                f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.partial_rotary_factor}) must be even and in (0, head_dim]"
            )
        if self.rms_norm_eps <= 0 or not math.isfinite(self.rms_norm_eps):
            raise ModelLoadError(f"config rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0 or not math.isfinite(self.rope_theta):
            raise ModelLoadError(f"config rope_theta must be positive, got {self.rope_theta}")
        if not math.isfinite(self.routed_scaling_factor):
            raise ModelLoadError("config routed_scaling_factor must be finite")
        if self.first_k_dense_replace < self.num_hidden_layers:  # at least one MoE layer
            self._validate_moe()
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ModelLoadError(f"config eos_token_id {tok} outside vocab of {self.vocab_size}")

    def _validate_moe(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ModelLoadError(
                f"config n_routed_experts ({self.n_routed_experts}) is not a multiple of "
                f"n_group ({self.n_group})"
            )
        if self.n_routed_experts // self.n_group < 2:
            raise ModelLoadError("config needs at least 2 routed experts per group (group score = top-2 sum)")
        if self.topk_group > self.n_group:
            raise ModelLoadError(f"config topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        selectable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > selectable:
            raise ModelLoadError(
                f"config num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {selectable} experts "
                f"in topk_group={self.topk_group} groups"
            )


def _get_int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"config {key} must be an integer, got {value!r}")
    return value


def _get_opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"config {key} must be an integer or null, got {value!r}")
    return value


def _get_float(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"config {key} must be a number, got {value!r}")
    return float(value)


def _get_bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, bool):
        raise ModelLoadError(f"config {key} must be true/false, got {value!r}")
    return value


def _parse_eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ModelLoadError(f"config eos_token_id must be an int or a list of ints, got {value!r}")
    return tuple(dict.fromkeys(items))


def _parse_rope(data: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) with transformers' precedence rules."""
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"config rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}: only 'default' RoPE is implemented")
    theta = params.get("rope_theta", data.get("rope_theta", _DEFAULT_ROPE_THETA))
    factor = params.get("partial_rotary_factor", data.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY))
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelLoadError(f"config {name} must be a number, got {value!r}")
    if not 0.0 < float(factor) <= 1.0:
        raise ModelLoadError(f"config partial_rotary_factor must be in (0, 1], got {factor}")
    return float(theta), float(factor)
