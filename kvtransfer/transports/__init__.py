"""Transport backends behind one interface (:mod:`.base`), chosen by ``TransferConfig.transport``.

There is no fallback: asking for a transport that cannot run here (nccl without libnccl or a
GPU, shm without a usable ``shm_dir``) raises :class:`TransportUnavailableError` at start-up.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.kv_layout import KVLayout
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.transports.base import PostControl, RecvBackend, RecvSink, SendBackend


def make_send_backend(
    config: TransferConfig, store: PageStore, post_control: PostControl, *, nccl_lib: Any = None
) -> SendBackend:
    if config.transport == "shm":
        from pdserve.kvtransfer.transports.shm import ShmSendBackend

        return ShmSendBackend(config, store, post_control)
    if config.transport == "tcp":
        from pdserve.kvtransfer.transports.tcp import TcpSendBackend

        return TcpSendBackend(config, store, post_control)
    if config.transport == "nccl":
        from pdserve.kvtransfer.transports.nccl import NcclSendBackend

        return NcclSendBackend(config, store, post_control, lib=nccl_lib)
    from pdserve.kvtransfer.transports.fake import FakeSendBackend

    return FakeSendBackend(config, store, post_control)


def make_recv_backend(
    config: TransferConfig,
    layout: KVLayout,
    num_blocks: int,
    *,
    incarnation: str,
    sink: RecvSink,
    host: str,
    nccl_lib: Any = None,
) -> RecvBackend:
    if config.transport == "shm":
        from pdserve.kvtransfer.transports.shm import ShmRecvBackend

        return ShmRecvBackend(config, layout, num_blocks, incarnation, sink)
    if config.transport == "tcp":
        from pdserve.kvtransfer.transports.tcp import TcpRecvBackend

        return TcpRecvBackend(config, layout, num_blocks, sink, host=host)
    if config.transport == "nccl":
        from pdserve.kvtransfer.transports.nccl import NcclRecvBackend

        return NcclRecvBackend(config, layout, num_blocks, sink, lib=nccl_lib)
    from pdserve.kvtransfer.transports.fake import FakeRecvBackend

    return FakeRecvBackend(config, layout, num_blocks, sink)


__all__ = ["RecvBackend", "SendBackend", "make_recv_backend", "make_send_backend"]
