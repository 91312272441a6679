"""KV transfer end to end on 127.0.0.1: bit-exact scattered pages for every transport, layer
streaming, decode-first rendezvous in both arrival orders, fake rooms, metrics, no leaks."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.sender import TransferResult
from pdserve.kvtransfer.shm_pool import list_segments
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.testing import fast_config as cfg
from pdserve.kvtransfer.testing import open_fds, same_pages, service_pair, tiny_layout
from pdserve.kvtransfer.transports.nccl_lib import LoopbackP2P

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

async def one_room(
    prefill: PrefillTransferService,
    decode: DecodeTransferService,
    room: int,
    src: list[int],
    dst: list[int],
    *,
    stream: bool = False,
    register_delay: float = 0.0,
    sender_delay: float = 0.0,
) -> tuple[TransferResult, AuxData]:
    aux = AuxData(room=room, first_token_id=room % 1000, first_token_logprob=-0.5, cached_tokens=len(src))

    async def prefill_leg() -> TransferResult:
        await asyncio.sleep(sender_delay)
        sender = prefill.create_sender(room)
        await sender.wait_ready(5.0)
        sender.set_source(src)
        if stream:  # the model runner's hook, from the engine thread, in chunks

            def engine() -> None:
                half = len(src) // 2
                for layer in range(prefill.layout.num_layers):
                    sender.on_layer_done(layer, half)
                for layer in range(prefill.layout.num_layers):
                    sender.on_layer_done(layer)

            t = threading.Thread(target=engine)
            t.start()
            await asyncio.to_thread(t.join, 5.0)
        return await sender.finish(aux)

    async def decode_leg() -> AuxData:
        await asyncio.sleep(register_delay)
        return await decode.receive("127.0.0.1", prefill.bootstrap_port, room, dst)

    result, got = await asyncio.gather(prefill_leg(), decode_leg())
    assert got == aux
    return result, got


def kv_threads() -> list[str]:
    """Threads this package started (data movers, receive threads) that are still alive."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kv-"))


def scattered(rng: np.random.Generator, n: int, pool: int) -> list[int]:
    return [int(x) for x in rng.permutation(pool)[:n]]


@pytest.mark.parametrize("transport", ["shm", "tcp", "nccl"])
async def test_bit_exact_scattered_pages_every_transport(transport: str) -> None:
    layout = tiny_layout()
    lib = LoopbackP2P() if transport == "nccl" else None
    threads_before, fds_before = kv_threads(), open_fds()
    config = cfg(transport, checksum=True, frame_pages=4)
    async with service_pair(config, layout, src_blocks=64, dst_blocks=96, nccl_lib=lib) as (prefill, decode):
        rng = np.random.default_rng(1)
        free = scattered(rng, 96, 96)  # the decode allocator hands out disjoint pages
        rooms = []
        for i, stream in enumerate((False, True, False)):
            n = 5 + 7 * i
            src = scattered(rng, n, 64) if i != 2 else list(range(20, 20 + n))  # last: contiguous source
            dst, free = free[: n + 3], free[n + 3 :]
            rooms.append((1000 + i, src, dst, stream))
        results = await asyncio.gather(
            *(one_room(prefill, decode, room, src, dst, stream=stream) for room, src, dst, stream in rooms)
        )
        for (room, src, dst, _), (result, _aux) in zip(rooms, results, strict=True):
            assert same_pages(prefill.store.storage, src, decode.kv_storage, dst[: len(src)]), room
            assert result.nbytes == len(src) * layout.block_nbytes and result.transport == transport
        assert prefill.pages_held() == 0 and decode.pages_held() == 0
        assert not prefill.rooms and not decode.rooms
        sent = prefill.registry.get_sample_value(
            "pdserve:kv_transfer_bytes_total", {"side": "prefill", "transport": transport}
        )
        assert sent == sum(r.nbytes for r, _ in results)
        assert decode.describe()["transport"] == prefill.describe()["transport"] == transport
    assert kv_threads() == threads_before
    assert open_fds() <= fds_before  # every socket, eventfd and segment fd closed
    assert not [s for s in list_segments() if s.split("-")[2] == str(os.getpid())]


@pytest.mark.parametrize("order", ["decode_first", "prefill_first"])
async def test_rendezvous_in_both_arrival_orders(order: str) -> None:
    layout = tiny_layout()
    async with service_pair(cfg("tcp"), layout) as (prefill, decode):
        delays = {"register_delay": 0.3} if order == "prefill_first" else {"sender_delay": 0.3}
        src, dst = [3, 1, 2], [9, 8, 7]
        await one_room(prefill, decode, 77, src, dst, **delays)
        assert same_pages(prefill.store.storage, src, decode.kv_storage, dst)


async def test_fake_rooms_complete_instantly_and_move_nothing() -> None:
    layout = tiny_layout()
    async with service_pair(cfg("fake"), layout) as (prefill, decode):
        sender = prefill.create_sender(5)
        await sender.wait_ready(1.0)
        result = await sender.finish(AuxData(room=5, first_token_id=1))
        assert result.nbytes == 0 and sender.poll() == KVPoll.Success
        aux = await decode.receive("10.255.255.1", 9, 5, [0, 1])
        assert aux.room == 5
    async with service_pair(cfg("tcp"), layout) as (prefill, decode):
        fake = prefill.config.fake_bootstrap_host
        sender = prefill.create_sender(6, bootstrap_host=fake)
        assert (await sender.finish(AuxData(room=6, first_token_id=1))).nbytes == 0
        assert (await asyncio.wait_for(decode.receive(fake, 8998, 6, [1]), 1.0)).room == 6
        assert not decode.peers  # nothing was dialled


async def test_metrics_describe_and_room_polls() -> None:
    layout = tiny_layout()
    async with service_pair(cfg("shm"), layout) as (prefill, decode):
        await one_room(prefill, decode, 9, [1, 2], [3, 4])
        desc = prefill.describe()
        assert desc["transport"] == "shm" and desc["layout"] == layout.to_dict()
        assert decode.describe()["backend"]["segment"].startswith("pdserve-kv-")
        assert prefill.poll(9) is None  # finished rooms are forgotten
        from prometheus_client import generate_latest

        text = generate_latest(prefill.registry).decode()
        assert 'pdserve:kv_transfer_bytes_total{side="prefill",transport="shm"}' in text
        assert "pdserve:kv_transfer_duration_seconds_bucket" in text
        assert 'pdserve:kv_transfer_pages_held{side="prefill"} 0.0' in text
