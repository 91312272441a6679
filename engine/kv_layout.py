"""The KV page layout: the contract between the engine's paged KV cache and the transfer service.

Storage is one tensor per worker (tensor-parallel rank), layer-major::

    kv[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]     (index 0 = K, 1 = V)

so ``kv[layer, kind, block]`` — one *page* — is a contiguous run of ``page_nbytes`` bytes, and a
request's pages are addressed by block id. ``num_kv_heads`` is the number of KV heads held by
this rank (the model's KV heads divided by ``tp_size``). ``num_blocks`` is deliberately not part
of the layout: two peers with different pool sizes are compatible; anything else must match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pdserve.errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class LayoutMismatchError(ConfigError):
    """Two peers' KV layouts differ in a field that must match."""


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"KVLayout.tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"KVLayout.dtype {self.dtype!r} not one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def page_numel(self) -> int:
        """Elements in one page: one layer, K or V, one block."""
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def page_nbytes(self) -> int:
        return self.page_numel * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers, K and V."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block id across all layers, K and V."""
        return self.num_layers * 2 * self.page_nbytes

    def storage_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def check_compatible(self, other: KVLayout) -> None:
        """Raise :class:`LayoutMismatchError` naming every field that differs."""
        diffs = [
            f"{k}: {v!r} != {getattr(other, k)!r}"
            for k, v in asdict(self).items()
            if getattr(other, k) != v
        ]
        if diffs:
            raise LayoutMismatchError("KV layout mismatch (" + "; ".join(diffs) + ")")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        try:
            return cls(**data)
        except TypeError as exc:
            raise LayoutMismatchError(f"malformed KV layout {data!r}: {exc}") from exc


def allocate_kv_storage(
    layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A zeroed KV pool for ``num_blocks`` blocks in this layout (private memory)."""
    if num_blocks <= 0:
        raise ConfigError(f"num_blocks must be positive, got {num_blocks}")
    return torch.zeros(layout.storage_shape(num_blocks), dtype=layout.torch_dtype, device=device)
