"""shm transport: same host; the decode pool is a shared-memory segment the prefill writes into.

Prefill side: ``connect`` maps the decode's segment by name (checked against the registered
incarnation, block count and layout); ``send_pages`` copies straight from the prefill's pages
into the destination pages — one strided copy per joint run covering every layer of the job
(``dst[l0:l1, :, d:d+n] <- src[l0:l1, :, s:s+n]``), so scattered pages cost one call per page
across all layers, not one per (layer, kind, page). ``done`` goes on the control channel after
the copies returned, so the decode side sees completed writes.

Decode side: allocates the pool with :class:`SharedKVPool` and unlinks it on ``close``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from pdserve.engine.kv_layout import KVLayout
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import HandshakeError, TransportError
from pdserve.kvtransfer.pages import PageStore, joint_runs
from pdserve.kvtransfer.shm_pool import SharedKVPool
from pdserve.kvtransfer.transports.base import (
    DecodePeer,
    PostControl,
    RecvBackend,
    RecvSink,
    SendBackend,
    SendJob,
)

logger = logging.getLogger(__name__)

_MAX_COPY_BYTES = 64 << 20
_STRIDED_MIN_LAYERS = 4  # jobs with fewer layers copy per (layer, kind) with numpy


class ShmSendBackend(SendBackend):
    name: ClassVar[str] = "shm"

    def __init__(self, config: TransferConfig, store: PageStore, post_control: PostControl) -> None:
        super().__init__(config, store, post_control)
        self._peers: dict[str, tuple[SharedKVPool, PageStore]] = {}

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "shm_dir": self.config.shm_dir, "mapped_segments": len(self._peers)}

    def connect(self, peer: DecodePeer) -> None:
        if peer.decode_inc in self._peers:
            return
        ep = peer.endpoint
        segment, num_blocks = ep.get("segment"), ep.get("num_blocks")
        if not isinstance(segment, str) or not isinstance(num_blocks, int):
            raise HandshakeError(
                "shm registration lacks segment/num_blocks", side="prefill", phase="bootstrap"
            )
        pool = SharedKVPool.attach(
            segment,
            layout=self.store.layout,
            num_blocks=num_blocks,
            incarnation=peer.decode_inc,
            shm_dir=self.config.shm_dir,
        )
        if pool.storage is None:  # pragma: no cover - attach always maps
            raise TransportError("shm segment mapped without storage", side="prefill", phase="bootstrap")
        self._peers[peer.decode_inc] = (pool, PageStore(self.store.layout, pool.storage))
        logger.info("mapped decode %s shm segment %s", peer.decode_addr, segment)

    def send_pages(self, job: SendJob) -> int:
        entry = self._peers.get(job.decode_inc)
        if entry is None:
            raise TransportError(
                "no mapped segment for this decode", side="prefill", phase="transfer", room=job.room
            )
        src_ids = job.src[job.pos_lo : job.pos_hi]
        dst_ids = job.dst[job.pos_lo : job.pos_hi]
        runs = joint_runs(src_ids, dst_ids)
        if job.layer_hi - job.layer_lo < _STRIDED_MIN_LAYERS:
            return self._per_layer(job, entry[1], src_ids, dst_ids, runs)
        dst = entry[1].pages[job.layer_lo : job.layer_hi]
        src = self.store.pages[job.layer_lo : job.layer_hi]
        moved = 0
        per_position = (job.layer_hi - job.layer_lo) * 2 * self.store.page_nbytes
        # one strided copy per run covers every layer and both kinds; bounded so that an abort
        # waits at most ~one chunk
        chunk = max(1, _MAX_COPY_BYTES // per_position)
        for start, length in runs:
            for off in range(0, length, chunk):
                if job.cancel.is_set():
                    return moved
                n = min(chunk, length - off)
                s, d = int(src_ids[start + off]), int(dst_ids[start + off])
                dst[:, :, d : d + n].copy_(src[:, :, s : s + n])
                moved += n * per_position
        return moved

    def _per_layer(
        self,
        job: SendJob,
        dst: PageStore,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        runs: list[tuple[int, int]],
    ) -> int:
        """Layer-streaming jobs (few layers): a memcpy per run per (layer, kind), no torch dispatch."""
        moved = 0
        for layer in range(job.layer_lo, job.layer_hi):
            if job.cancel.is_set():
                return moved
            for kind in (0, 1):
                s_rows, d_rows = self.store.host_pages(layer, kind), dst.host_pages(layer, kind)
                for start, n in runs:
                    s, d = int(src_ids[start]), int(dst_ids[start])
                    d_rows[d : d + n] = s_rows[s : s + n]
            moved += 2 * src_ids.size * self.store.page_nbytes
        return moved

    def disconnect(self, decode_inc: str) -> None:
        entry = self._peers.pop(decode_inc, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for inc in list(self._peers):
            self.disconnect(inc)


class ShmRecvBackend(RecvBackend):
    name: ClassVar[str] = "shm"

    def __init__(
        self, config: TransferConfig, layout: KVLayout, num_blocks: int, incarnation: str, sink: RecvSink
    ) -> None:
        self.pool = SharedKVPool.create(layout, num_blocks, shm_dir=config.shm_dir, incarnation=incarnation)
        if self.pool.storage is None:  # pragma: no cover - create always maps
            raise TransportError("shm pool created without storage", phase="setup")
        super().__init__(config, PageStore(layout, self.pool.storage), sink)

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "segment": self.pool.name, "pool_bytes": self.store.nbytes}

    def endpoint(self) -> dict[str, int | str]:
        return {"segment": self.pool.name, "num_blocks": self.pool.num_blocks}

    def close(self) -> None:
        self.pool.close()
