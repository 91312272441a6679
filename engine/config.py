"""The engine's config section: model, KV cache size and scheduling limits.

``model`` None means the embedded tiny default model (built on first use). Two fields depend on
the model and are resolved when the engine loads it:

* the KV pool size: exactly one of ``num_blocks`` / ``kv_cache_memory_gb`` may be set; the other
  is derived from the model's KV layout (:meth:`EngineConfig.resolve_num_blocks`). With neither
  set, the pool is what ``max_num_seqs`` sequences of ``max_model_len`` tokens need, capped at
  :data:`DEFAULT_KV_CACHE_GB`.
* ``max_model_len`` defaults to the model's ``max_position_embeddings`` and may not exceed it
  (:meth:`EngineConfig.resolve_max_model_len`). The pool must hold one full-length sequence, so a
  lone request can always finish.

Invalid values raise :class:`pdserve.errors.ConfigError` naming the field (``param``); build
configs from untrusted input with :meth:`EngineConfig.build`, which maps pydantic's
``ValidationError`` to that error.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.errors import ConfigError

DEFAULT_KV_CACHE_GB = 0.25
_GIB = 1 << 30


class EngineConfig(BaseModel):
    """Engine settings (``engine:`` section of the pdserve config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, description="GLM-4-MoE checkpoint directory (HF layout); None = the embedded default model"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block (page)")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks in the pool")
    kv_cache_memory_gb: float | None = Field(None, gt=0, description="KV pool size in GiB")
    max_num_seqs: int = Field(64, ge=1, description="sequences in the running batch at most")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens computed per step at most")
    max_model_len: int | None = Field(None, ge=2, description="context limit (prompt + output)")
    enable_prefix_caching: bool = True
    seed: int = Field(0, ge=0, description="seed of the engine's generator (unseeded requests)")
    show_progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.num_blocks is not None and self.kv_cache_memory_gb is not None:
            raise ValueError("set at most one of num_blocks and kv_cache_memory_gb")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step"
            )
        if not self.device or not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'mps', got {self.device!r}")
        return self

    @classmethod
    def build(cls, **kwargs: Any) -> EngineConfig:
        """Construct from keyword values, raising :class:`ConfigError` (not pydantic's error)."""
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ())) or "engine"
            msg = first.get("msg", str(exc)).removeprefix("Value error, ")
            raise ConfigError(f"invalid engine config: {loc}: {msg}", param=loc) from exc

    def resolve_max_model_len(self, model_max_len: int) -> int:
        """The effective context limit for a model whose ``max_position_embeddings`` is given."""
        if self.max_model_len is None:
            return model_max_len
        if self.max_model_len > model_max_len:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{model_max_len}",
                param="max_model_len",
            )
        return self.max_model_len

    def resolve_num_blocks(self, block_nbytes: int, max_model_len: int) -> int:
        """KV blocks in the pool, given the bytes one block takes across all layers (K and V)."""
        if block_nbytes <= 0:
            raise ConfigError(f"block_nbytes must be positive, got {block_nbytes}")
        if self.num_blocks is not None:
            num_blocks = self.num_blocks
        elif self.kv_cache_memory_gb is not None:
            num_blocks = int(self.kv_cache_memory_gb * _GIB) // block_nbytes
        else:
            wanted = self.max_num_seqs * math.ceil(max_model_len / self.block_size)
            num_blocks = min(wanted, int(DEFAULT_KV_CACHE_GB * _GIB) // block_nbytes)
        self.check_pool(num_blocks, max_model_len)
        return num_blocks

    def check_pool(self, num_blocks: int, max_model_len: int) -> None:
        """A pool must hold at least one sequence of ``max_model_len`` tokens."""
        needed = math.ceil(max_model_len / self.block_size)
        if num_blocks < needed:
            raise ConfigError(
                f"the KV pool ({num_blocks} blocks of {self.block_size} tokens) cannot hold one sequence of "
                f"max_model_len={max_model_len} tokens ({needed} blocks): raise num_blocks / "
                f"kv_cache_memory_gb or lower max_model_len",
                param="num_blocks",
            )
