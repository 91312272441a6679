"""The engine's only device code: owns the model weights and the paged KV pool, runs one step.

Lifecycle:

1. construction parses/validates the model config, checks dtype/device, loads the checkpoint
   straight to the device (``engine.weights``), derives the :class:`KVLayout` and allocates the KV
   pool — or adopts a caller-provided one (e.g. a shared-memory segment owned by the KV transfer
   service), which must match ``layout.storage_shape(num_blocks)``, dtype and device;
2. :meth:`ModelRunner.run` packs the step's chunks into one flat token batch with vectorised host
   index math, validating them on the way (``engine.batch.pack_chunks``), builds the attention
   metadata once, runs the forward pass under ``torch.inference_mode`` —
   writing each new token's K/V into its slot and calling ``on_layer_done(i)`` after layer ``i``'s
   K/V are written — and returns float32 logits for the chunks with ``need_logits``, in order;
3. the runner holds no per-request state; dropping it frees the weights and (if it allocated it)
   the KV pool.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pdserve.engine.attention import metadata_from_packed
from pdserve.engine.batch import BatchLimits, SeqChunk, pack_chunks
from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.engine.model import Glm4MoeModel, MtpLayerWeights
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.weights import load_weights
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a CUDA device that is not there is a ConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}", param="device") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available", param="device")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA devices", param="device"
            )
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'", param="device")
    return dev


class ModelRunner:
    """Weights + KV pool + one-step forward for a GLM-4-MoE checkpoint in ``model_dir``.

    ``model_config``: the parsed config, or None to read ``model_dir/config.json``.
    ``dtype``: ``float32`` | ``bfloat16`` | ``float16`` — weights, activations and the KV pool.
    ``device``: ``cpu`` | ``cuda[:N]``. ``block_size``/``num_blocks``: KV pool geometry.
    ``kv_storage``: adopt this pool instead of allocating one (shape, dtype, device must match).
    ``show_progress``: tqdm bar on stderr while loading. ``num_threads``: CPU intra-op threads
    (default: half the CPUs available to the process, at least 1).
    Raises :class:`ConfigError` (or its subclass :class:`ModelLoadError`) for unusable settings
    or checkpoints.
    """

    def __init__(
        self,
        model_config: ModelConfig | None,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int,
        num_blocks: int,
        kv_storage: torch.Tensor | None = None,
        show_progress: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"unsupported dtype {dtype!r}: use one of {sorted(_DTYPES)}", param="dtype")
        if block_size <= 0 or num_blocks <= 0:
            raise ConfigError(f"block_size ({block_size}) and num_blocks ({num_blocks}) must be positive")
        self._device = resolve_device(device)
        self._dtype = _DTYPES[dtype]
        if self._device.type == "cpu":
            _set_cpu_threads(num_threads)
        cfg = model_config if model_config is not None else ModelConfig.from_dir(model_dir)
        self._config = cfg
        self._layout = KVLayout(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            dtype=dtype,
            block_size=block_size,
        )
        self._num_blocks = num_blocks
        self._limits = BatchLimits(
            num_blocks=num_blocks, max_positions=cfg.max_position_embeddings, vocab_size=cfg.vocab_size
        )
        if kv_storage is not None:
            self._check_kv_storage(kv_storage)
        t0 = time.perf_counter()
        weights = load_weights(
            cfg, model_dir, dtype=self._dtype, device=self._device, show_progress=show_progress
        )
        self._model = Glm4MoeModel(cfg, weights, self._device, self._dtype)
        self._kv = (
            kv_storage
            if kv_storage is not None
            else allocate_kv_storage(self._layout, num_blocks, self._device)
        )
        logger.info(
            "loaded %s (%d layers, %d experts) as %s on %s in %.2fs; KV pool %d blocks x %d tokens (%.1fMiB)",
            model_dir,
            cfg.num_hidden_layers,
            cfg.n_routed_experts,
            dtype,
            self._device,
            time.perf_counter() - t0,
            num_blocks,
            block_size,
            num_blocks * self._layout.block_nbytes / 2**20,
        )

    # ------------------------------------------------------------------ properties
    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def kv_storage(self) -> torch.Tensor:
        return self._kv

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._layout.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def mtp_weights(self) -> list[MtpLayerWeights]:
        """MTP (NextN) layers found in the checkpoint, for speculative decoding; may be empty."""
        return self._model.weights.mtp

    # ------------------------------------------------------------------ step
    def run(self, chunks: list[SeqChunk], on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Compute one step; float32 logits ``[chunks with need_logits, vocab]`` in chunk order."""
        cfg = self._config
        if not chunks:
            return torch.empty(0, cfg.vocab_size, dtype=torch.float32)
        batch = pack_chunks(chunks, self._layout.block_size, self._limits)
        device = self._device
        with torch.inference_mode():
            meta = metadata_from_packed(batch, device, self._dtype)
            input_ids = torch.from_numpy(batch.token_ids).to(device)
            rows = None if batch.all_rows_need_logits else torch.from_numpy(batch.logit_rows).to(device)
            hidden = self._model.forward(input_ids, meta, self._kv, rows, on_layer_done)
        # The LM head runs outside inference mode so the caller gets an ordinary tensor it may
        # modify in place (sampling penalties, masking).
        with torch.no_grad():
            logits = self._model.compute_logits(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _check_kv_storage(self, kv: torch.Tensor) -> None:
        want = self._layout.storage_shape(self._num_blocks)
        if tuple(kv.shape) != want:
            raise ConfigError(f"kv_storage has shape {list(kv.shape)}, expected {list(want)}")
        if kv.dtype != self._dtype:
            raise ConfigError(f"kv_storage dtype {kv.dtype} != runner dtype {self._dtype}")
        if kv.device != self._device:
            raise ConfigError(f"kv_storage is on {kv.device}, runner on {self._device}")
        if not kv.is_contiguous():
            raise ConfigError("kv_storage must be contiguous")


def _set_cpu_threads(num_threads: int | None) -> None:
    """Intra-op threads for CPU compute: ``num_threads``, else half the CPUs this process may run
    on (at least 1). A prefill and a decode worker usually share a CPU host, and oversubscribed
    OpenMP pools are catastrophic for the many small ops of a decode step (measured 5-10x slower
    on a busy 2-core box), so the default leaves room for the peer process."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    want = num_threads if num_threads is not None else max(1, available // 2)
    if want <= 0:
        raise ConfigError(f"num_threads must be positive, got {want}", param="num_threads")
    if torch.get_num_threads() != want:
        logger.info("using %d CPU threads for model compute (%d CPUs available)", want, available)
        torch.set_num_threads(want)
