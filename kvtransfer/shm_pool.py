"""``SharedKVPool``: a decode worker's whole KV pool in one shared-memory segment.

Lifecycle:

1. ``create(layout, num_blocks)`` (decode side): sweeps segments left by dead processes, creates
   ``<shm_dir>/pdserve-kv-<pid>-<incarnation prefix>`` exclusively (mode 0600), allocates it in
   full (``posix_fallocate``: a pool that does not fit fails here with a clear error instead of
   a SIGBUS mid-request), writes a header (magic, pid, incarnation, num_blocks, layout) and maps
   the data part (pre-populated) as the storage tensor handed to the engine;
2. ``attach(name, ...)`` (prefill side, same host): opens the segment by name and refuses it
   unless the header names the incarnation, block count and layout the decode registered with,
   so a restarted decode's segment is never confused with its predecessor's; the mapping is
   pre-populated (``MAP_POPULATE``) so copies into it run at memcpy speed from the first one;
3. ``close()``: the owner unlinks the segment (the name disappears at once; the memory goes
   when the last mapping — e.g. an engine still holding the tensor — is dropped); an attacher
   only drops its mapping. Owners killed with SIGKILL leave their segment behind; the next
   ``create`` on the host removes it (its pid is dead).

Plain ``mmap`` is used rather than ``multiprocessing.shared_memory`` so no resource-tracker
process is involved (it unlinks attached segments behind the owner's back and warns at exit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import uuid
import weakref
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.kv_layout import KVLayout
from pdserve.errors import ConfigError
from pdserve.kvtransfer.errors import HandshakeError, TransferLayoutMismatchError, TransportError

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "pdserve-kv-"
HEADER_BYTES = 4096
_MAGIC = b"PDKVSHM1"
# MAP_POPULATE: fill the page tables at map time, so the first copies into a page do not each
# take a page fault (a cold mapping copies ~4x slower than a warm one)
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_HEAD = struct.Struct("<8sQQ32sI")  # magic, pid, num_blocks, incarnation (hex), layout json length


class SharedKVPool:
    """A KV pool tensor backed by a named shared-memory segment."""

    def __init__(
        self, *, path: Path, mm: mmap.mmap, layout: KVLayout, num_blocks: int, incarnation: str, owner: bool
    ) -> None:
        self.path = path
        self.name = path.name
        self.layout = layout
        self.num_blocks = num_blocks
        self.incarnation = incarnation
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        # safety net for owners dropped without close(): unlink at garbage collection / exit
        self._finalizer = weakref.finalize(self, _unlink_quietly, str(path)) if owner else None
        data = torch.frombuffer(
            mm, dtype=torch.uint8, offset=HEADER_BYTES, count=self.data_nbytes(layout, num_blocks)
        )
        self.storage: torch.Tensor | None = data.view(layout.torch_dtype).view(
            layout.storage_shape(num_blocks)
        )

    @staticmethod
    def data_nbytes(layout: KVLayout, num_blocks: int) -> int:
        return layout.block_nbytes * num_blocks

    @classmethod
    def create(
        cls, layout: KVLayout, num_blocks: int, *, shm_dir: str = "/dev/shm", incarnation: str | None = None
    ) -> SharedKVPool:
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {num_blocks}")
        inc = incarnation or uuid.uuid4().hex
        directory = Path(shm_dir)
        if not directory.is_dir():
            raise ConfigError(f"shm_dir {shm_dir!r} is not a directory")
        sweep_stale(directory)
        path = directory / f"{SEGMENT_PREFIX}{os.getpid()}-{inc[:16]}"
        size = HEADER_BYTES + cls.data_nbytes(layout, num_blocks)
        layout_json = json.dumps(layout.to_dict(), sort_keys=True).encode()
        if _HEAD.size + len(layout_json) > HEADER_BYTES:
            raise ConfigError("KV layout too large for the shm header")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise TransportError(f"cannot create shm segment {path}: {exc}", phase="setup") from exc
        try:
            os.ftruncate(fd, size)
            # reserve the memory now: a sparse segment would SIGBUS on a full /dev/shm later
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise TransportError(
                f"cannot allocate/map shm segment {path} ({size / 2**30:.2f} GiB; is {shm_dir} large "
                f"enough?): {exc}",
                phase="setup",
            ) from exc
        os.close(fd)
        mm[: _HEAD.size] = _HEAD.pack(_MAGIC, os.getpid(), num_blocks, inc.encode(), len(layout_json))
        mm[_HEAD.size : _HEAD.size + len(layout_json)] = layout_json
        logger.info("created shm KV pool %s (%d blocks, %.2f GiB)", path, num_blocks, size / 2**30)
        return cls(path=path, mm=mm, layout=layout, num_blocks=num_blocks, incarnation=inc, owner=True)

    @classmethod
    def attach(
        cls, name: str, *, layout: KVLayout, num_blocks: int, incarnation: str, shm_dir: str = "/dev/shm"
    ) -> SharedKVPool:
        """Map a decode's segment; refuse it unless it is exactly the one that was registered."""
        if "/" in name or not name.startswith(SEGMENT_PREFIX):
            raise HandshakeError(f"invalid shm segment name {name!r}", side="prefill", phase="bootstrap")
        path = Path(shm_dir) / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise HandshakeError(
                f"cannot open shm segment {path} (shm needs both workers on one host): {exc}",
                side="prefill",
                phase="bootstrap",
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise HandshakeError(f"shm segment {path} is truncated", side="prefill", phase="bootstrap")
            mm = mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise HandshakeError(
                f"cannot map shm segment {path}: {exc}", side="prefill", phase="bootstrap"
            ) from exc
        finally:
            os.close(fd)
        try:
            head = read_header(mm)
            if head["incarnation"] != incarnation:
                raise HandshakeError(
                    f"shm segment {name} belongs to incarnation {head['incarnation']}, not {incarnation}",
                    side="prefill",
                    phase="bootstrap",
                    reason="peer_restarted",
                )
            seg_layout = KVLayout.from_dict(head["layout"])
            if seg_layout != layout:
                raise TransferLayoutMismatchError(
                    f"shm segment {name} layout {seg_layout} != {layout}", side="prefill", phase="bootstrap"
                )
            if head["num_blocks"] != num_blocks or size != HEADER_BYTES + cls.data_nbytes(layout, num_blocks):
                raise HandshakeError(
                    f"shm segment {name} holds {head['num_blocks']} blocks / {size} bytes, "
                    f"registered {num_blocks} blocks",
                    side="prefill",
                    phase="bootstrap",
                )
        except Exception:
            mm.close()
            raise
        return cls(
            path=path, mm=mm, layout=layout, num_blocks=num_blocks, incarnation=incarnation, owner=False
        )

    def close(self) -> None:
        """Owner: unlink. Everyone: drop this object's mapping (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()  # unlinks once; later calls are no-ops
        self.storage = None
        mm, self._mm = self._mm, None
        if mm is not None:
            # BufferError: a tensor view is still alive (e.g. the engine's); the mapping goes with it
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> SharedKVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:  # pragma: no cover - permissions changed under us
        logger.warning("could not unlink shm segment %s: %s", path, exc)


def read_header(mm: mmap.mmap) -> dict[str, Any]:
    magic, pid, num_blocks, inc, layout_len = _HEAD.unpack(mm[: _HEAD.size])
    if magic != _MAGIC or layout_len > HEADER_BYTES - _HEAD.size:
        raise HandshakeError("not a pdserve KV shm segment", side="prefill", phase="bootstrap")
    try:
        layout = json.loads(mm[_HEAD.size : _HEAD.size + layout_len])
    except ValueError as exc:
        raise HandshakeError("corrupt shm segment header", side="prefill", phase="bootstrap") from exc
    if not isinstance(layout, dict):
        raise HandshakeError("corrupt shm segment header", side="prefill", phase="bootstrap")
    return {"pid": pid, "num_blocks": num_blocks, "incarnation": inc.decode(), "layout": layout}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path) -> list[str]:
    """Unlink segments whose creating process is gone; returns their names."""
    removed: list[str] = []
    for path in directory.glob(f"{SEGMENT_PREFIX}*"):
        parts = path.name[len(SEGMENT_PREFIX) :].split("-")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        if not _pid_alive(int(parts[0])):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("could not remove stale shm segment %s: %s", path, exc)
    if removed:
        logger.info("removed %d stale shm KV segments: %s", len(removed), ", ".join(removed))
    return removed


def list_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Names of pdserve KV segments currently present (for leak checks)."""
    return sorted(p.name for p in Path(shm_dir).glob(f"{SEGMENT_PREFIX}*"))
