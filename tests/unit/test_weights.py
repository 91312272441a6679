"""Checkpoint loading: single file, sharded index, MTP layers, dtypes, and every ModelLoadError case."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import make_checkpoint, make_runner, prompt
from safetensors.torch import load_file, save_file

from pdserve.engine.batch import SeqChunk
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.moe import MoEWeights
from pdserve.engine.weights import expected_shapes, load_weights
from pdserve.errors import ModelLoadError

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("single"), seed=2, use_qk_norm=True)


@pytest.fixture
def copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(ckpt, dst)
    return dst


def load(path: Path, dtype: torch.dtype = torch.float32) -> object:
    return load_weights(ModelConfig.from_dir(path), path, dtype=dtype, device=CPU, show_progress=False)


def rewrite(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Set (or with None delete) tensors of a single-file checkpoint."""
    tensors = load_file(str(path / "model.safetensors"))
    for name, value in edit.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def mtp_tensors(cfg: ModelConfig, with_head: bool = True) -> dict[str, torch.Tensor]:
    idx, h = cfg.num_hidden_layers, cfg.hidden_size
    gen = torch.Generator().manual_seed(0)
    names = {n: s for n, s in expected_shapes(cfg, idx + 1).items() if n.startswith(f"model.layers.{idx}.")}
    names.update(
        {f"model.layers.{idx}.{n}": s for n, s in (("eh_proj.weight", (h, 2 * h)), ("enorm.weight", (h,)))}
    )
    names[f"model.layers.{idx}.hnorm.weight"] = (h,)
    names[f"model.layers.{idx}.shared_head.norm.weight"] = (h,)
    if with_head:
        names[f"model.layers.{idx}.shared_head.head.weight"] = (cfg.vocab_size, h)
    return {n: torch.randn(s, generator=gen) for n, s in names.items()}


def test_single_file_layout_and_dtypes(ckpt: Path) -> None:
    cfg = ModelConfig.from_dir(ckpt)
    w = load_weights(cfg, ckpt, dtype=torch.bfloat16, device=CPU, show_progress=False)
    moe = w.layers[1].mlp
    assert isinstance(moe, MoEWeights)
    # router weight and correction bias stay float32, as HF keeps them
    assert moe.router.dtype == torch.float32 and moe.correction_bias.dtype == torch.float32
    assert moe.gate_up.dtype == torch.bfloat16 and moe.gate_up.shape == (8, 64, 64)
    assert moe.down.shape == (8, 64, 32)
    assert w.layers[0].attn.qkv.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    tensors = load_file(str(ckpt / "model.safetensors"))
    # stacked expert 5: gate rows then up rows
    e5 = "model.layers.2.mlp.experts.5."
    stacked = w.layers[2].mlp.gate_up[5]  # type: ignore[union-attr]
    assert torch.equal(stacked[:32], tensors[e5 + "gate_proj.weight"].bfloat16())
    assert torch.equal(stacked[32:], tensors[e5 + "up_proj.weight"].bfloat16())
    assert torch.equal(moe.correction_bias, tensors["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert w.mtp == []


def test_sharded_checkpoint_matches_single(ckpt: Path, tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", seed=2, shard_size="60KB", use_qk_norm=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = prompt(0, 9)
    a = make_runner(ckpt, num_blocks=8).run([SeqChunk(ids, 0, [0, 1, 2])])
    b = make_runner(sharded, num_blocks=8).run([SeqChunk(ids, 0, [0, 1, 2])])
    assert torch.equal(a, b)


def test_mtp_weights_loaded_separately(ckpt: Path, copy: Path) -> None:
    cfg = ModelConfig.from_dir(copy)
    extra = mtp_tensors(cfg)
    save_file(extra, str(copy / "mtp.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model.safetensors" for n in load_file(str(copy / "model.safetensors"))}
    weight_map.update({n: "mtp.safetensors" for n in extra})
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    runner = make_runner(copy, num_blocks=8)
    (mtp,) = runner.mtp_weights
    p = f"model.layers.{cfg.num_hidden_layers}."
    assert mtp.layer_idx == cfg.num_hidden_layers
    assert torch.equal(mtp.eh_proj, extra[p + "eh_proj.weight"])
    assert mtp.head is not None and torch.equal(mtp.head, extra[p + "shared_head.head.weight"])
    assert mtp.embed is None
    assert isinstance(mtp.decoder.mlp, MoEWeights)
    assert torch.equal(mtp.decoder.mlp.router, extra[p + "mlp.gate.weight"])
    # the main forward ignores MTP weights
    ids = prompt(1, 6)
    plain = make_runner(ckpt, num_blocks=8)
    assert torch.equal(runner.run([SeqChunk(ids, 0, [0, 1])]), plain.run([SeqChunk(ids, 0, [0, 1])]))


def test_mtp_absent_logs_one_info_line(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pdserve.engine.weights"):
        load(ckpt)
    lines = [r.getMessage() for r in caplog.records if r.name == "pdserve.engine.weights"]
    assert len(lines) == 1 and "MTP" in lines[0] and "does not build" in lines[0]


def test_partial_mtp_layer_is_an_error(copy: Path) -> None:
    cfg = ModelConfig.from_dir(copy)
    extra = mtp_tensors(cfg)
    p = f"model.layers.{cfg.num_hidden_layers}."
    rewrite(copy, {p + "eh_proj.weight": extra[p + "eh_proj.weight"]})
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.3\."):
        load(copy)


def test_tied_embeddings(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, seed=4, tie_word_embeddings=True)
    w = load(path)
    assert w.lm_head is w.embed  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            {"model.layers.1.mlp.experts.3.up_proj.weight": None},
            "missing tensor 'model.layers.1.mlp.experts.3.up_proj",
        ),
        ({"model.norm.weight": None}, "missing tensor 'model.norm.weight'"),
        ({"model.layers.0.self_attn.k_proj.bias": torch.zeros(65)}, r"k_proj.bias' has shape \[65\]"),
        ({"model.layers.2.mlp.gate.weight": torch.zeros(8, 63)}, r"gate.weight' has shape \[8, 63\]"),
        (
            {"model.layers.0.mlp.foo.weight": torch.zeros(2)},
            "unexpected tensor 'model.layers.0.mlp.foo.weight'",
        ),
        ({"model.layers.7.eh_proj.weight": torch.zeros(2)}, "unexpected tensor 'model.layers.7.eh_proj"),
    ],
)
def test_bad_tensors(copy: Path, edit: dict[str, torch.Tensor | None], match: str) -> None:
    rewrite(copy, edit)
    with pytest.raises(ModelLoadError, match=match):
        load(copy)


def test_old_rotary_buffers_are_ignored(copy: Path) -> None:
    rewrite(copy, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    load(copy)


def test_missing_shard_named_in_index(copy: Path) -> None:
    names = load_file(str(copy / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors.*missing"):
        load(copy)


def test_garbled_index(copy: Path) -> None:
    (copy / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
        load(copy)


def test_garbled_safetensors(copy: Path) -> None:
    (copy / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelLoadError, match=r"cannot read safetensors file model\.safetensors"):
        load(copy)


def test_no_weights(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load(copy)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        make_runner(tmp_path / "absent")


def test_garbled_config_through_runner(copy: Path) -> None:
    (copy / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        make_runner(copy)


def test_unknown_model_type_through_runner(copy: Path) -> None:
    data = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**data, "model_type": "deepseek_v3"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'deepseek_v3'"):
        make_runner(copy)
