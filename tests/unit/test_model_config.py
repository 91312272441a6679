"""ModelConfig parsing of HF glm4_moe config.json files (new and legacy layouts) and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.engine.model_config import ModelConfig
from pdserve.errors import ModelLoadError

pytestmark = pytest.mark.unit

# The config.json of zai-org/GLM-4.5 as published (legacy layout: top-level rope_theta and
# partial_rotary_factor, eos list, no rope_parameters).
GLM45: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "partial_rotary_factor": 0.5,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "model_type": "glm4_moe",
    "moe_intermediate_size": 1536,
    "norm_topk_prob": True,
    "num_attention_heads": 96,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "num_hidden_layers": 92,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
    "use_cache": True,
    "use_qk_norm": True,
    "vocab_size": 151552,
}


def test_glm45_legacy_layout() -> None:
    cfg = ModelConfig.from_dict(GLM45)
    assert cfg.rope_theta == 1e6 and cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 64
    assert cfg.eos_token_ids == (151329, 151336, 151338)
    assert cfg.pad_token_id == 151329 and cfg.bos_token_id is None
    assert cfg.head_dim == 128 and cfg.num_kv_groups == 12 and cfg.q_size == 96 * 128
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 91)] == [False, False, True, True]
    assert cfg.use_qk_norm and cfg.attention_bias and cfg.routed_scaling_factor == 2.5
    assert cfg.num_nextn_predict_layers == 1 and cfg.torch_dtype == "bfloat16"
    assert cfg.extra["initializer_range"] == 0.02


SMALL: dict[str, Any] = {"model_type": "glm4_moe", "hidden_size": 256, "num_attention_heads": 16}


def test_matches_hf_config_semantics() -> None:
    """Rope/head_dim resolution agrees with transformers' own Glm4MoeConfig."""
    from transformers import Glm4MoeConfig

    cases: list[dict[str, Any]] = [
        GLM45,
        SMALL,  # defaults otherwise
        {**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}},
        {**SMALL, "rope_theta": 5.0, "rope_parameters": {"partial_rotary_factor": 1.0}},
        {**SMALL, "partial_rotary_factor": 0.25, "rope_theta": 3000, "head_dim": 64},
    ]
    for data in cases:
        hf = Glm4MoeConfig(**{k: v for k, v in data.items() if k != "model_type"})
        cfg = ModelConfig.from_dict(data)
        assert cfg.rope_theta == hf.rope_parameters["rope_theta"], data
        assert cfg.partial_rotary_factor == hf.rope_parameters.get("partial_rotary_factor", 1.0), data
        assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads), data
        for name in ("n_routed_experts", "moe_intermediate_size", "first_k_dense_replace", "rms_norm_eps"):
            assert getattr(cfg, name) == getattr(hf, name), (name, data)


def test_eos_int_and_mtp_alias() -> None:
    cfg = ModelConfig.from_dict({**SMALL, "eos_token_id": 7, "num_mtp_layers": 0})
    assert cfg.eos_token_ids == (7,) and cfg.num_nextn_predict_layers == 0


def test_from_dir_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GLM45))
    assert ModelConfig.from_dir(tmp_path) == ModelConfig.from_dict(GLM45)
    assert ModelConfig.from_dict(GLM45).to_dict()["eos_token_ids"] == [151329, 151336, 151338]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no config.json"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"model_type": "llama"}), "unsupported model_type 'llama'"),
        (json.dumps({"hidden_size": 8}), "unsupported model_type None"),
        (json.dumps({"model_type": "glm4_moe", "architectures": ["LlamaForCausalLM"]}), "architectures"),
    ],
)
def test_unusable_files(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_dir(tmp_path)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
        ({"hidden_size": "big"}, "hidden_size must be an integer"),
        ({"use_qk_norm": "yes"}, "true/false"),
        ({"n_group": 3}, "multiple of n_group"),
        ({"topk_group": 2}, "exceeds n_group"),
        ({"n_group": 160}, "at least 2 routed experts per group"),
        ({"n_group": 8, "topk_group": 1, "num_experts_per_tok": 21}, "exceeds the 20 experts"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"eos_token_id": 10**6}, "outside vocab"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
        ({"quantization_config": {"quant_method": "fp8"}}, r"quantized checkpoints \(fp8\)"),
    ],
)
def test_invalid_values(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_dict({**GLM45, **override})
