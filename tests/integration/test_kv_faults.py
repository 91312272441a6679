"""Fault handling on 127.0.0.1 with both services in this process: aborts from either side,
cancellation, every phase's timeout, layout/transport mismatch, garbage and truncated input,
checksum mismatch. Each ends in bounded time with nothing held on either side."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import zmq
import zmq.asyncio

from pdserve.kvtransfer import errors as E
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import (
    CONTROL_MAGIC,
    DATA_KIND_DONE,
    DATA_KIND_PAGES,
    Ack,
    AuxData,
    Done,
    encode,
    pack_data_header,
)
from pdserve.kvtransfer.sender import KVSender
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.testing import fast_config as cfg
from pdserve.kvtransfer.testing import open_fds, service_pair, tiny_layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
T = TypeVar("T")

async def raises(aw: Awaitable[Any], cls: type[E.TransferError], within: float) -> E.TransferError:
    """Await ``aw``; it must raise ``cls`` within ``within`` seconds."""
    t0 = time.monotonic()
    with pytest.raises(cls) as info:
        await asyncio.wait_for(aw, within)
    assert time.monotonic() - t0 < within
    return info.value


def clean(*services: PrefillTransferService | DecodeTransferService) -> None:
    for svc in services:
        assert svc.pages_held() == 0 and not svc.rooms, svc.describe()


async def until(pred: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def streaming_room(
    prefill: PrefillTransferService, decode: DecodeTransferService, room: int
) -> tuple[KVSender, asyncio.Task[AuxData]]:
    """A room whose first layer moved and whose prefill is 'still computing' the rest."""
    recv = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, room, [5, 9, 2, 7]))
    sender = prefill.create_sender(room)
    await sender.wait_ready(5.0)
    sender.set_source([1, 2, 3, 8])
    sender.on_layer_done(0)
    await until(lambda: decode.poll(room) == KVPoll.Transferring)
    return sender, recv


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_decode_aborts_mid_transfer(transport: str) -> None:
    fds = open_fds()
    async with service_pair(cfg(transport), tiny_layout()) as (prefill, decode):
        sender, recv = await streaming_room(prefill, decode, 11)
        decode.abort(11, "client disconnected")
        err = await raises(recv, E.TransferAbortedError, 2.0)
        assert err.side == "decode" and err.phase == "transfer"
        perr = await raises(sender.finish(AuxData(room=11, first_token_id=0)), E.TransferAbortedError, 2.0)
        assert perr.side == "decode" and "client disconnected" in perr.message
        await until(lambda: not prefill.rooms)
        clean(prefill, decode)
    assert open_fds() <= fds


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_prefill_aborts_mid_transfer(transport: str) -> None:
    async with service_pair(cfg(transport), tiny_layout()) as (prefill, decode):
        sender, recv = await streaming_room(prefill, decode, 12)
        sender.abort("prefill worker cancelled the request")
        perr = await raises(sender.finish(AuxData(room=12, first_token_id=0)), E.TransferAbortedError, 2.0)
        assert perr.side == "prefill"
        err = await raises(recv, E.TransferAbortedError, 2.0)
        assert err.side == "prefill" and err.details.get("remote") is True
        clean(prefill, decode)


async def test_cancelled_receive_aborts_both_legs() -> None:
    async with service_pair(cfg("shm"), tiny_layout()) as (prefill, decode):
        sender, recv = await streaming_room(prefill, decode, 13)
        recv.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(recv, 3.0)
        await raises(sender.finish(AuxData(room=13, first_token_id=0)), E.TransferAbortedError, 2.0)
        clean(prefill, decode)


async def test_bootstrap_timeouts_both_ways() -> None:
    async with service_pair(cfg(bootstrap_timeout_s=0.4), tiny_layout()) as (prefill, decode):
        # the prefill request never comes: the parked registration expires and decode hears it
        err = await raises(
            decode.receive("127.0.0.1", prefill.bootstrap_port, 21, [1]), E.TransferTimeoutError, 2.0
        )
        assert (err.side, err.phase) == ("prefill", "bootstrap")
        late = prefill.create_sender(21)  # the half-dispatched leg fails at once too
        await raises(late.wait_ready(), E.TransferTimeoutError, 1.0)
        # the decode leg never comes: the sender's own bootstrap timer fires
        lonely = prefill.create_sender(22)
        err = await raises(lonely.wait_ready(), E.TransferTimeoutError, 2.0)
        assert (err.side, err.phase) == ("prefill", "bootstrap")
        clean(prefill, decode)


async def test_waiting_timeout_fails_both_legs() -> None:
    async with service_pair(cfg(waiting_timeout_s=0.4), tiny_layout()) as (prefill, decode):
        recv = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, 23, [1, 2]))
        sender = prefill.create_sender(23)
        err = await raises(recv, E.TransferTimeoutError, 2.0)
        assert err.phase == "waiting"
        assert sender.poll() == KVPoll.Failed or await until(lambda: sender.poll() == KVPoll.Failed) is None
        clean(prefill, decode)


async def test_unreachable_bootstrap_endpoint_fails_in_seconds() -> None:
    async with service_pair(cfg(heartbeat_interval_s=0.1, heartbeat_misses=3), tiny_layout()) as (_, decode):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nobody listens there
        err = await raises(decode.receive("127.0.0.1", port, 24, [1]), E.PeerDeadError, 2.0)
        assert (err.side, err.phase) == ("decode", "bootstrap")
        clean(decode)


@pytest.mark.parametrize(
    ("decode_over", "field"), [({"head_dim": 32}, "head_dim"), ({"tp_size": 2, "tp_rank": 1}, "tp_size")]
)
async def test_layout_mismatch_is_refused_on_both_sides(decode_over: dict[str, int], field: str) -> None:
    layout = tiny_layout()
    async with service_pair(cfg(), layout, decode_layout=tiny_layout(**decode_over)) as (prefill, decode):
        sender = prefill.create_sender(31)
        err = await raises(
            decode.receive("127.0.0.1", prefill.bootstrap_port, 31, [1]), E.TransferLayoutMismatchError, 2.0
        )
        assert field in err.message and err.reason == "layout_mismatch"
        perr = await raises(sender.wait_ready(), E.TransferLayoutMismatchError, 1.0)
        assert field in perr.message
        clean(prefill, decode)


async def test_transport_mismatch_is_refused() -> None:
    async with service_pair(cfg("tcp"), tiny_layout(), decode_config=cfg("shm")) as (prefill, decode):
        err = await raises(
            decode.receive("127.0.0.1", prefill.bootstrap_port, 32, [1]), E.HandshakeError, 2.0
        )
        assert "'shm'" in err.message and "'tcp'" in err.message
        clean(prefill, decode)


async def test_bad_requests_are_typed_errors() -> None:
    async with service_pair(cfg(), tiny_layout(), dst_blocks=8) as (prefill, decode):
        for blocks in ([], [1, 1], [8], [-1]):
            with pytest.raises(E.RoomError):
                await decode.receive("127.0.0.1", prefill.bootstrap_port, 33, blocks)
        with pytest.raises(E.RoomError):
            await decode.receive("127.0.0.1", prefill.bootstrap_port, -5, [1])
        prefill.create_sender(34)
        with pytest.raises(E.RoomError):
            prefill.create_sender(34)
        prefill.abort(34)
        await until(lambda: not prefill.rooms)
        clean(prefill, decode)


async def test_garbage_on_the_bootstrap_port_is_dropped() -> None:
    async with service_pair(cfg(), tiny_layout()) as (prefill, decode):
        with socket.create_connection(("127.0.0.1", prefill.bootstrap_port)) as raw:
            raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.1\r\n\r\n")
        ctx = zmq.asyncio.Context()
        try:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.ROUTING_ID, b"ab" * 16)
            dealer.connect(f"tcp://127.0.0.1:{prefill.bootstrap_port}")
            for frames in (
                [b"junk"],
                [CONTROL_MAGIC, b"{not json"],
                [CONTROL_MAGIC, json.dumps({"t": "ping"}).encode()],
                [
                    CONTROL_MAGIC,
                    json.dumps({"t": "ping", "decode_inc": "ef" * 16, "decode_addr": "x"}).encode(),
                ],
            ):
                await dealer.send_multipart(frames)
            await until(
                lambda: (
                    (
                        prefill.registry.get_sample_value(
                            "pdserve:kv_transfer_protocol_errors_total", {"side": "prefill"}
                        )
                        or 0
                    )
                    >= 4
                )
            )
        finally:
            ctx.destroy(linger=0)
        recv = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, 41, [3]))
        sender = prefill.create_sender(41)
        await sender.wait_ready(2.0)
        sender.set_source([2])
        _, aux = await asyncio.gather(sender.finish(AuxData(room=41, first_token_id=5)), recv)
        assert aux.first_token_id == 5
        clean(prefill, decode)


async def test_garbage_and_truncated_frames_on_the_tcp_data_socket() -> None:
    layout = tiny_layout()
    async with service_pair(cfg(), layout) as (prefill, decode):
        recv_a = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, 51, [1, 2]))
        recv_b = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, 52, [3, 4]))
        senders = [prefill.create_sender(51), prefill.create_sender(52)]
        for s in senders:
            await s.wait_ready(2.0)
        ctx = zmq.asyncio.Context()
        try:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(str(decode.backend.endpoint()["data_addr"]))
            inc, page = decode.incarnation, layout.page_nbytes
            await push.send_multipart([b"garbage header"])  # counted and dropped
            await push.send_multipart(
                [pack_data_header(DATA_KIND_PAGES, 999, inc, 0, 0, 1), b"x"]
            )  # unknown room
            # room 51: a V frame short by one byte
            await push.send_multipart(
                [pack_data_header(DATA_KIND_PAGES, 51, inc, 0, 0, 1), b"k" * page, b"v" * (page - 1)]
            )
            # room 52: done, although no page ever arrived
            done = Done(
                room=52,
                prefill_inc=prefill.incarnation,
                aux=AuxData(room=52, first_token_id=0),
                num_pages=2,
                nbytes=0,
            )
            await push.send_multipart(
                [pack_data_header(DATA_KIND_DONE, 52, inc, 0, 0, 0), done.model_dump_json().encode()]
            )
            err_a = await raises(recv_a, E.ProtocolError, 2.0)
            err_b = await raises(recv_b, E.ProtocolError, 2.0)
        finally:
            ctx.destroy(linger=0)
        assert "expected" in err_a.message and "never arrived" in err_b.message
        for s in senders:  # the decode told the prefill legs, which failed too
            await until(lambda s=s: s.poll() == KVPoll.Failed, 2.0)
            await raises(s.finish(AuxData(room=s.room, first_token_id=0)), E.ProtocolError, 1.0)
        assert (
            decode.registry.get_sample_value("pdserve:kv_transfer_protocol_errors_total", {"side": "decode"})
            or 0
        ) >= 2
        clean(prefill, decode)


async def test_garbage_on_the_decode_control_channel() -> None:
    """A fake prefill endpoint answers with garbage, then a done for too many pages."""
    layout = tiny_layout()
    ctx = zmq.asyncio.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        async with service_pair(cfg(), layout) as (_, decode):
            recv = asyncio.ensure_future(decode.receive("127.0.0.1", port, 61, [1]))
            ident, *_ = await asyncio.wait_for(router.recv_multipart(), 2.0)
            fake_inc = "12" * 16
            for frames in ([b"\x00"], [CONTROL_MAGIC, b"[]"], [CONTROL_MAGIC, b'{"t":"ack","room":61}']):
                await router.send_multipart([ident, *frames])
            await router.send_multipart([ident, *encode(Ack(room=61, prefill_inc=fake_inc))])
            bad = Done(
                room=61, prefill_inc=fake_inc, aux=AuxData(room=61, first_token_id=0), num_pages=5, nbytes=1
            )
            await router.send_multipart([ident, *encode(bad)])
            err = await raises(recv, E.ProtocolError, 2.0)
            assert "5 pages" in err.message
            assert (
                decode.registry.get_sample_value(
                    "pdserve:kv_transfer_protocol_errors_total", {"side": "decode"}
                )
                or 0
            ) >= 3
            clean(decode)
    finally:
        ctx.destroy(linger=0)


async def test_checksum_mismatch_fails_both_legs(monkeypatch: pytest.MonkeyPatch) -> None:
    async with service_pair(cfg("shm", checksum=True), tiny_layout()) as (prefill, decode):
        real = PageStore.layer_checksums

        def corrupt(self: PageStore, ids: Any, layers: Any = None) -> list[int]:
            sums = real(self, ids, layers)
            return [s ^ 1 if self is prefill.store and i == 2 else s for i, s in enumerate(sums)]

        monkeypatch.setattr(PageStore, "layer_checksums", corrupt)
        recv = asyncio.ensure_future(decode.receive("127.0.0.1", prefill.bootstrap_port, 71, [4, 5, 6]))
        sender = prefill.create_sender(71)
        await sender.wait_ready(2.0)
        sender.set_source([1, 2, 3])
        results = await asyncio.gather(
            sender.finish(AuxData(room=71, first_token_id=0)), recv, return_exceptions=True
        )
        assert all(isinstance(r, E.ChecksumError) for r in results), results
        assert "layers [2]" in str(results[1])
        clean(prefill, decode)
