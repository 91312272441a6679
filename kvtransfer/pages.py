"""Page addressing: validating block ids, planning copies, views into a KV pool, checksums.

A request's transfer maps *positions* ``0..n-1`` (its pages in token order) from the prefill's
source block ids to the decode's destination block ids: position ``i`` of layer ``l`` and kind
``k`` (0 = K, 1 = V) copies page ``src[l, k, src_ids[i]]`` into ``dst[l, k, dst_ids[i]]``.

* :func:`joint_runs` merges positions whose source *and* destination ids are both consecutive:
  one run = one contiguous copy per (layer, kind) on both sides.
* :func:`plan_groups` cuts a position range into groups of at most ``max_pages`` positions —
  long joint runs stay whole (zero-copy on both sides), short ones are batched into one group
  that each side gathers/scatters with one indexed copy.
* :class:`PageStore` validates a storage tensor against a :class:`KVLayout` and gives page-run
  tensors and byte views.
* :func:`PageStore.layer_checksums`: crc32 per layer over the K pages then the V pages of the
  given positions, in position order; both sides compute it over their own ids, so equal
  checksums mean the bytes arrived bit-exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.kv_layout import KVLayout
from pdserve.errors import ConfigError
from pdserve.kvtransfer.errors import RoomError

MAX_PAGES_PER_ROOM = 1 << 20


def as_block_array(
    ids: Sequence[int] | np.ndarray, num_blocks: int, *, side: str, room: int | None, what: str
) -> np.ndarray:
    """Validate block ids (ints in ``[0, num_blocks)``, no duplicates, not empty) as int64."""
    try:
        arr = np.asarray(ids, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RoomError(f"{what}: block ids must be integers", side=side, phase="setup", room=room) from exc
    if arr.ndim != 1 or arr.size == 0:
        raise RoomError(f"{what}: need a non-empty list of block ids", side=side, phase="setup", room=room)
    if arr.size > MAX_PAGES_PER_ROOM:
        raise RoomError(f"{what}: {arr.size} pages is too many", side=side, phase="setup", room=room)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_blocks:
        raise RoomError(
            f"{what}: block ids must lie in [0, {num_blocks}), got [{lo}, {hi}]",
            side=side,
            phase="setup",
            room=room,
        )
    if np.unique(arr).size != arr.size:
        raise RoomError(f"{what}: duplicate block ids", side=side, phase="setup", room=room)
    return arr


def runs_of(ids: np.ndarray) -> list[tuple[int, int]]:
    """``(start position, length)`` of each maximal run of consecutive ids."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [ids.size]))
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def joint_runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int]]:
    """Runs of positions where both ``src`` and ``dst`` ids are consecutive."""
    n = min(src.size, dst.size)
    if n == 0:
        return []
    ok = (np.diff(src[:n]) == 1) & (np.diff(dst[:n]) == 1)
    breaks = np.flatnonzero(~ok) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def plan_groups(src: np.ndarray, dst: np.ndarray, lo: int, hi: int, max_pages: int) -> list[tuple[int, int]]:
    """Cut positions ``[lo, hi)`` into ``(start, length)`` groups of at most ``max_pages``.

    Joint runs of at least ``max_pages // 2`` positions become their own groups (split at
    ``max_pages``); shorter runs are batched together until a group is full."""
    groups: list[tuple[int, int]] = []
    pend_start, pend_len = lo, 0
    long_run = max(1, max_pages // 2)
    for start, length in joint_runs(src[:hi], dst[:hi]):
        s, e = max(start, lo), min(start + length, hi)
        if s >= e:
            continue
        if e - s >= long_run:
            if pend_len:
                groups.append((pend_start, pend_len))
                pend_len = 0
            for g in range(s, e, max_pages):
                groups.append((g, min(max_pages, e - g)))
            continue
        while s < e:
            if pend_len == 0:
                pend_start = s
            take = min(e - s, max_pages - pend_len)
            pend_len += take
            s += take
            if pend_len == max_pages:
                groups.append((pend_start, pend_len))
                pend_len = 0
    if pend_len:
        groups.append((pend_start, pend_len))
    return groups


def is_consecutive(ids: np.ndarray) -> bool:
    return ids.size <= 1 or bool(int(ids[-1]) - int(ids[0]) == ids.size - 1 and np.all(np.diff(ids) == 1))


class PageStore:
    """A KV pool viewed as pages: ``pages[layer, kind, block]`` is one page of ``page_numel``."""

    def __init__(self, layout: KVLayout, storage: torch.Tensor) -> None:
        if (
            storage.dim() != 6
            or tuple(storage.shape[:2]) != (layout.num_layers, 2)
            or tuple(storage.shape[3:]) != (layout.block_size, layout.num_kv_heads, layout.head_dim)
        ):
            raise ConfigError(
                f"KV storage shape {tuple(storage.shape)} does not match layout "
                f"{layout.storage_shape(-1)} (num_blocks free)"
            )
        if storage.dtype != layout.torch_dtype:
            raise ConfigError(f"KV storage dtype {storage.dtype} != layout dtype {layout.dtype}")
        if not storage.is_contiguous():
            raise ConfigError("KV storage must be contiguous")
        self.layout = layout
        self.storage = storage
        self.num_blocks = int(storage.shape[2])
        self.page_nbytes = layout.page_nbytes
        self.pages = storage.view(layout.num_layers, 2, self.num_blocks, layout.page_numel)
        self.is_cuda = storage.is_cuda
        self._u8: np.ndarray | None = None
        if not self.is_cuda:
            flat = storage.view(-1).view(torch.uint8)
            self._u8 = flat.numpy().reshape(layout.num_layers, 2, self.num_blocks, self.page_nbytes)

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.layout.itemsize

    def run(self, layer: int, kind: int, block: int, n: int) -> torch.Tensor:
        """Pages ``block..block+n-1`` of (layer, kind): a contiguous ``[n, page_numel]`` view."""
        return self.pages[layer, kind, block : block + n]

    def run_bytes(self, layer: int, kind: int, block: int, n: int) -> memoryview:
        """The same pages as a writable byte view (host pools only)."""
        if self._u8 is None:
            raise ConfigError("byte views exist only for host (CPU) KV pools")
        return self._u8[layer, kind, block : block + n].data.cast("B")

    def host_pages(self, layer: int, kind: int) -> np.ndarray:
        """``[num_blocks, page_nbytes]`` uint8 view of one (layer, kind) (host pools only).

        Scattered gathers/scatters go through numpy (``np.take(..., out=)`` and fancy
        assignment copy whole rows with memcpy; torch's CPU ``index_copy_`` is far slower)."""
        if self._u8 is None:
            raise ConfigError("byte views exist only for host (CPU) KV pools")
        rows: np.ndarray = self._u8[layer, kind]
        return rows

    def layer_checksums(self, ids: np.ndarray, layers: Sequence[int] | None = None) -> list[int]:
        """crc32 per layer over ``pages[l, 0, ids]`` then ``pages[l, 1, ids]`` in id order."""
        out: list[int] = []
        runs = runs_of(ids)
        for layer in range(self.layout.num_layers) if layers is None else layers:
            crc = 0
            for kind in (0, 1):
                if self._u8 is not None:
                    for pos, n in runs:
                        crc = zlib.crc32(self._u8[layer, kind, int(ids[pos]) : int(ids[pos]) + n].data, crc)
                else:
                    index = torch.from_numpy(ids).to(self.pages.device)
                    host = self.pages[layer, kind].index_select(0, index).cpu().contiguous()
                    crc = zlib.crc32(host.view(torch.uint8).numpy().data, crc)
            out.append(crc)
        return out
