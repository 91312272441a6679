"""The embedded tiny GLM-4-MoE checkpoint: layout, determinism, HF loadability, cache, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from pdserve import cli as pdserve_cli
from pdserve.engine import default_model
from pdserve.engine.default_model import (
    MANIFEST_FILE,
    default_config,
    ensure_default_model,
    init_model,
    model_fingerprint,
    read_manifest,
    validate_config,
)
from pdserve.engine.random_weights import random_weights, weight_specs
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import ConfigError, ModelLoadError

pytestmark = pytest.mark.unit

EXPECTED_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", MANIFEST_FILE,
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.getbasetemp() / "pdserve-cache")


@pytest.fixture(scope="module")
def config(model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((model_dir / "config.json").read_text()))


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert index["weight_map"][name] == file
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def test_files_and_config(model_dir: Path, config: dict[str, Any]) -> None:
    assert model_dir.name == "tiny-glm4-moe-s0"
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    expected = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "torch_dtype": "float32",
        "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "partial_rotary_factor": 0.5, "attention_bias": True,
        "use_qk_norm": False, "norm_topk_prob": True, "max_position_embeddings": 8192,
        "rope_theta": 1e6, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["routed_scaling_factor"] in (1.0, 2.5)
    tok = Tokenizer.from_dir(model_dir)
    assert config["vocab_size"] == -(-tok.vocab_size // 64) * 64
    stops = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert config["eos_token_id"] == stops
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stops
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["eos_token"] == "<|endoftext|>"
    assert tcfg["chat_template"] == (model_dir / "chat_template.jinja").read_text()
    assert model_fingerprint(model_dir) == model_fingerprint(model_dir)


def test_weights_layout(model_dir: Path, config: dict[str, Any]) -> None:
    tensors = _tensors(model_dir)
    specs = {name: shape for name, shape, _ in weight_specs(config)}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == specs
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # first layer dense
    for layer in (1, 2, 3):  # MoE layers, including the MTP layer's block
        p = f"model.layers.{layer}.mlp"
        assert tensors[f"{p}.gate.weight"].shape == (8, 128)
        assert tensors[f"{p}.gate.e_score_correction_bias"].abs().min() > 0
        assert tensors[f"{p}.experts.7.down_proj.weight"].shape == (128, 64)
        assert tensors[f"{p}.shared_experts.up_proj.weight"].shape == (64, 128)
        assert tensors[f"model.layers.{layer}.self_attn.k_proj.bias"].abs().min() > 0
    mtp = "model.layers.3"
    assert tensors[f"{mtp}.eh_proj.weight"].shape == (128, 256)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        assert tensors[f"{mtp}.{norm}.weight"].shape == (128,)
    assert torch.equal(tensors[f"{mtp}.shared_head.head.weight"], tensors["lm_head.weight"])
    assert torch.equal(tensors[f"{mtp}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert not torch.equal(tensors["lm_head.weight"][:, :128], tensors["model.embed_tokens.weight"][:, :128])
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2


def test_same_seed_gives_identical_files(model_dir: Path, tmp_path: Path) -> None:
    again = init_model(tmp_path / "again", 0)
    for name in EXPECTED_FILES:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_seed_changes_weights_only(config: dict[str, Any]) -> None:
    a, b, a2 = random_weights(config, 0), random_weights(config, 1), random_weights(config, 0)
    assert all(torch.equal(a[n], a2[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_config_overrides_and_validation(config: dict[str, Any]) -> None:
    qk = {**config, "use_qk_norm": True}
    names = {n for n, _, _ in weight_specs(qk)}
    assert "model.layers.2.self_attn.q_norm.weight" in names
    assert "model.layers.3.self_attn.k_norm.weight" in names
    base = default_config(8192, [1, 2, 3], 1)
    validate_config(base, 8192)
    for bad in ({"n_group": 3}, {"topk_group": 3}, {"num_experts_per_tok": 5}, {"vocab_size": 64},
                {"num_key_value_heads": 3}, {"hidden_size": 0}, {"model_type": "llama"}):
        with pytest.raises(ConfigError):
            validate_config({**base, **bad}, 8192)
    with pytest.raises(ConfigError):
        init_model("/nonexistent-dir-for-test", -1)


def test_loads_with_transformers(model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    text = "你好 🙂 def f(): pass"
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text
    assert fast.encode(text, add_special_tokens=False) == Tokenizer.from_dir(model_dir).encode(text)
    model, info = transformers.Glm4MoeForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    model.eval()
    prompts = ["Hello there", "import os", "你好", "class A:"]
    firsts, gens = set(), []
    for p in prompts:
        ids = fast.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        gen = out[0, len(ids):].tolist()
        firsts.add(gen[0])
        gens.append(gen)
        assert len(set(gen)) >= 8  # greedy output is varied, not one repeated token
    assert len(firsts) >= 3  # and depends on the prompt
    with torch.no_grad():  # deterministic
        again = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert again[0, len(ids):].tolist() == gens[-1]


def test_ensure_default_model_reuses_and_repairs(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    calls: list[Path] = []

    def fake_init(out: Path, seed: int = 0, **_: Any) -> Path:
        calls.append(Path(out))
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        return Path(out)

    monkeypatch.setattr(default_model, "init_model", fake_init)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(cache))
    first = ensure_default_model()
    assert first == cache / "models" / "tiny-glm4-moe-s0" and len(calls) == 1
    assert ensure_default_model() == first and len(calls) == 1  # reused
    (first / "model-00002-of-00002.safetensors").write_bytes(b"truncated")
    assert read_manifest(first) is None
    with pytest.raises(ModelLoadError):
        model_fingerprint(first)
    assert ensure_default_model() == first and len(calls) == 2  # rebuilt
    assert read_manifest(first) is not None
    assert [p.name for p in (cache / "models").iterdir()] == ["tiny-glm4-moe-s0"]  # no temp dirs left


def test_ensure_default_model_loses_race_cleanly(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "models" / "tiny-glm4-moe-s0"

    def racing_init(out: Path, seed: int = 0, **_: Any) -> Path:
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        shutil.copytree(model_dir, final)  # another process finishes first
        return Path(out)

    monkeypatch.setattr(default_model, "init_model", racing_init)
    assert ensure_default_model(tmp_path) == final
    assert sorted(p.name for p in final.parent.iterdir()) == ["tiny-glm4-moe-s0"]

    def failing_init(out: Path, seed: int = 0, **_: Any) -> Path:
        (Path(out) / "partial").write_text("x")
        raise ConfigError("disk full")

    monkeypatch.setattr(default_model, "init_model", failing_init)
    with pytest.raises(ConfigError, match="disk full"):
        ensure_default_model(tmp_path / "other")
    assert list((tmp_path / "other" / "models").iterdir()) == []  # temp dir removed


def test_cli_init_model(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    def fake_init(out: Path, seed: int = 0, **_: Any) -> Path:
        assert seed == 7
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        return Path(out)

    monkeypatch.setattr(default_model, "init_model", fake_init)
    target = tmp_path / "out"
    assert pdserve_cli.main(["init-model", str(target), "--seed", "7"]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())
    assert pdserve_cli.main(["init-model", str(target), "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdserve: error:") and "--force" in err and "\n" not in err
    (target / "notes.txt").write_text("keep me")
    assert pdserve_cli.main(["init-model", str(target), "--seed", "7", "--force"]) == 0
    assert (target / "notes.txt").read_text() == "keep me"
    assert pdserve_cli.main(["init-model", str(target / "notes.txt")]) == 2
    assert pdserve_cli.main(["init-model", str(tmp_path / "x"), "--seed", "-1"]) == 2
    assert os.listdir(tmp_path / "out")
