"""ModelRunner contract: KV pool ownership/adoption, chunk validation, layer hook, output shape."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import make_checkpoint, make_runner, prompt

from pdserve.engine.batch import InvalidBatchError, SeqChunk
from pdserve.engine.kv_layout import KVLayout
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.errors import ConfigError, ContextLengthError, InvalidRequestError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def runner(ckpt: Path) -> ModelRunner:
    return make_runner(ckpt, block_size=4, num_blocks=32)


def test_layout_and_properties(runner: ModelRunner) -> None:
    cfg = runner.model_config
    assert runner.layout == KVLayout(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        dtype="float32",
        block_size=4,
    )
    assert tuple(runner.kv_storage.shape) == runner.layout.storage_shape(32)
    assert runner.kv_storage.dtype == torch.float32
    assert runner.mtp_weights == []


def test_adopts_given_kv_storage(ckpt: Path) -> None:
    cfg = ModelConfig.from_dir(ckpt)
    layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, "float32", 4)
    kv = torch.zeros(layout.storage_shape(8))
    runner = ModelRunner(cfg, ckpt, block_size=4, num_blocks=8, kv_storage=kv, show_progress=False)
    assert runner.kv_storage is kv
    runner.run([SeqChunk(prompt(0, 6), 0, [5, 2])])
    assert kv[:, :, [5, 2]].abs().sum() > 0 and kv[:, :, [0, 1, 3, 4, 6, 7]].abs().sum() == 0


@pytest.mark.parametrize(
    ("make_kv", "match"),
    [
        (lambda shape: torch.zeros((*shape[:-1], shape[-1] + 1)), "shape"),
        (lambda shape: torch.zeros(shape, dtype=torch.bfloat16), "dtype"),
        (lambda shape: torch.zeros((*shape[:-1], shape[-1] * 2))[..., ::2], "contiguous"),
    ],
)
def test_rejects_mismatched_kv_storage(
    ckpt: Path, make_kv: Callable[[tuple[int, ...]], torch.Tensor], match: str
) -> None:
    cfg = ModelConfig.from_dir(ckpt)
    shape = (cfg.num_hidden_layers, 2, 8, 4, cfg.num_key_value_heads, cfg.head_dim)
    kv = make_kv(shape)
    with pytest.raises(ConfigError, match=match):
        ModelRunner(cfg, ckpt, block_size=4, num_blocks=8, kv_storage=kv, show_progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"block_size": 0}, "positive"),
    ],
)
def test_rejects_bad_settings(ckpt: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"block_size": 4, "num_blocks": 8, "show_progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ModelRunner(None, ckpt, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_config_error(ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        ModelRunner(None, ckpt, device="cuda", block_size=4, num_blocks=8, show_progress=False)


@pytest.mark.parametrize(
    ("chunk", "error", "match"),
    [
        (SeqChunk([], 0, [0]), InvalidBatchError, "no tokens"),
        (SeqChunk([1, 2], -1, [0]), InvalidBatchError, "negative"),
        (SeqChunk([1] * 5, 0, [0]), InvalidBatchError, "2 needed"),
        (SeqChunk([1], 4, [0]), InvalidBatchError, "2 needed"),
        (SeqChunk([1, 2], 0, [32]), InvalidBatchError, "outside"),
        (SeqChunk([1, 2], 0, [-1]), InvalidBatchError, "outside"),
        (SeqChunk([1, 640], 0, [0]), InvalidRequestError, "vocabulary"),
        (SeqChunk([-3], 0, [0]), InvalidRequestError, "vocabulary"),
        (SeqChunk([1, 2], 63, list(range(17))), ContextLengthError, "64 positions"),
    ],
)
def test_chunk_validation(runner: ModelRunner, chunk: SeqChunk, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        runner.run([SeqChunk([1], 0, [1]), chunk])


def test_last_position_is_allowed(runner: ModelRunner) -> None:
    assert runner.run([SeqChunk([1], 63, list(range(16)))]).shape[0] == 1


def test_need_logits_rows_in_chunk_order(runner: ModelRunner) -> None:
    a, b, c = prompt(1, 5), prompt(2, 3), prompt(3, 7)
    only = [runner.run([SeqChunk(p, 0, [i * 2, i * 2 + 1])])[0] for i, p in enumerate((a, b, c))]
    out = runner.run([SeqChunk(a, 0, [0, 1]), SeqChunk(b, 0, [2, 3], False), SeqChunk(c, 0, [4, 5])])
    assert out.shape == (2, runner.model_config.vocab_size) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([only[0], only[2]]), atol=1e-5, rtol=1e-5)
    assert runner.run([SeqChunk(b, 0, [2, 3], False)]).shape == (0, runner.model_config.vocab_size)
    assert runner.run([]).shape == (0, runner.model_config.vocab_size)


def test_logits_are_ordinary_tensors(runner: ModelRunner) -> None:
    out = runner.run([SeqChunk(prompt(4, 3), 0, [0])])
    assert not out.is_inference()
    out.div_(2.0)  # samplers modify logits in place


def test_on_layer_done_after_each_layers_kv_write(ckpt: Path) -> None:
    runner = make_runner(ckpt, block_size=4, num_blocks=8)
    kv = runner.kv_storage
    seen: list[int] = []

    def hook(layer: int) -> None:
        # this layer's pages for the new tokens are written, the next layer's not yet
        assert kv[layer, :, 3, :2].abs().sum() > 0
        if layer + 1 < kv.shape[0]:
            assert kv[layer + 1, :, 3].abs().sum() == 0
        seen.append(layer)

    runner.run([SeqChunk(prompt(5, 2), 0, [3])], on_layer_done=hook)
    assert seen == list(range(runner.model_config.num_hidden_layers))


def test_hook_error_propagates(runner: ModelRunner) -> None:
    def hook(layer: int) -> None:
        raise RuntimeError(f"transfer failed at {layer}")

    with pytest.raises(RuntimeError, match="transfer failed at 0"):
        runner.run([SeqChunk([1, 2], 0, [0])], on_layer_done=hook)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(ckpt: Path, runner: ModelRunner) -> None:
    chunks = [SeqChunk(prompt(6, 9), 0, [0, 1, 2]), SeqChunk([3], 5, [4, 5])]
    cpu = runner.run(chunks)
    for dtype, tol in (("float32", 1e-3), ("bfloat16", None)):
        gpu = ModelRunner(
            None, ckpt, dtype=dtype, device="cuda", block_size=4, num_blocks=32, show_progress=False
        )
        assert gpu.kv_storage.is_cuda
        out = gpu.run(chunks)
        assert out.is_cuda and out.dtype == torch.float32
        if tol is not None:
            torch.testing.assert_close(out.cpu(), cpu, atol=tol, rtol=tol)
        else:
            assert torch.nn.functional.cosine_similarity(out.cpu(), cpu).min().item() > 0.99
