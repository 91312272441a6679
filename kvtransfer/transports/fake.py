"""fake transport: no bytes move (SGLang's fake backend, for warmup and tests).

With ``transport="fake"`` every room completes as soon as both sides would have started it:
the decode side's ``receive`` resolves at once with placeholder aux data and the prefill
side's ``finish`` returns without touching the destination. The same short-circuit applies to
any room whose bootstrap host is ``TransferConfig.fake_bootstrap_host`` under any transport.
The decode pool is ordinary private memory. The services implement the short-circuit; these
backends exist so the fake transport sits behind the same interface (``describe()``, metrics).
"""

from __future__ import annotations

from typing import ClassVar

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.transports.base import DecodePeer, RecvBackend, RecvSink, SendBackend, SendJob


class FakeSendBackend(SendBackend):
    name: ClassVar[str] = "fake"

    def connect(self, peer: DecodePeer) -> None:
        return None

    def send_pages(self, job: SendJob) -> int:
        return 0

    def disconnect(self, decode_inc: str) -> None:
        return None

    def close(self) -> None:
        return None


class FakeRecvBackend(RecvBackend):
    name: ClassVar[str] = "fake"

    def __init__(self, config: TransferConfig, layout: KVLayout, num_blocks: int, sink: RecvSink) -> None:
        super().__init__(
            config, PageStore(layout, allocate_kv_storage(layout, num_blocks, config.device)), sink
        )

    def endpoint(self) -> dict[str, int | str]:
        return {}

    def close(self) -> None:
        return None
