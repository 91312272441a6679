"""The nccl transport's CUDA data path: a prefill on cuda:0 in this process, a decode on cuda:1
in another, scattered pages, layer streaming, bit-exact by digest. Needs 2 GPUs and libnccl
(the ``gpu`` extra); the control logic is covered on CPU by the loopback tests."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from pdserve.engine.kv_layout import allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import TransportUnavailableError
from pdserve.kvtransfer.peerproc import fill_random, pages_digest
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.testing import PeerProcess, tiny_layout
from pdserve.kvtransfer.transports.nccl_lib import NcclLibrary


def _why_not() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"needs 2 CUDA devices (NCCL cannot pair two ranks on one GPU); this machine has {n}"
    try:
        NcclLibrary()
    except TransportUnavailableError as exc:
        return str(exc)
    return None


REASON = _why_not()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


async def test_nccl_gpu_transfer_bit_exact() -> None:
    layout = tiny_layout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16)
    base = {"transport": "nccl", "heartbeat_interval_s": 0.5, "frame_pages": 8}
    prefill_cfg = TransferConfig.model_validate({**base, "device": "cuda:0"})
    decode_cfg = TransferConfig.model_validate({**base, "device": "cuda:1"})
    storage = allocate_kv_storage(layout, 256, "cuda:0")
    fill_random(storage, 11)
    prefill = PrefillTransferService(prefill_cfg, layout, storage, registry=CollectorRegistry())
    await prefill.start()
    peer = await asyncio.to_thread(PeerProcess, "decode", layout, 300, decode_cfg)
    try:
        src = [int(x) for x in torch.randperm(256)[:100]]
        dst = [int(x) for x in torch.randperm(300)[:100]]
        sender = prefill.create_sender(1)
        peer.send("receive", room=1, host="127.0.0.1", port=prefill.bootstrap_port, blocks=dst)
        await sender.wait_ready(30.0)
        sender.set_source(src)
        for layer in range(layout.num_layers):  # layer streaming, events on the current stream
            sender.on_layer_done(layer)
        from pdserve.kvtransfer.protocol import AuxData

        result = await asyncio.wait_for(sender.finish(AuxData(room=1, first_token_id=2)), 60.0)
        got = await peer.wait_event_async("received", within=60.0, room=1)
        assert got["ok"], got
        assert got["digest"] == pages_digest(prefill.store, src)
        assert result.nbytes == len(src) * layout.block_nbytes
    finally:
        await asyncio.to_thread(peer.close)
        await prefill.close()
