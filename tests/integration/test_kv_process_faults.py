"""Faults with real separate processes (killed with SIGKILL): the survivor fails the affected
rooms within a few seconds and holds no pages, sockets, threads or shm segments afterwards;
restarted peers at the same address are recognised by their new incarnation."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pdserve.kvtransfer import errors as E
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.peerproc import pages_digest
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.shm_pool import list_segments, sweep_stale
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.testing import PeerProcess, fast_config, open_fds, service_pair, tiny_layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def cfg(transport: str, **over: Any) -> TransferConfig:
    return fast_config(transport, phase_timeout_s=10.0, **over)


def kv_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kv-"))


async def until(pred: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_prefill_killed_mid_transfer(transport: str) -> None:
    layout = tiny_layout()
    config = cfg(transport)
    before, fds = kv_threads(), open_fds()
    peer = PeerProcess("prefill", layout, 64, config)
    try:
        async with service_pair(config, layout) as (_, decode):
            src, dst = [3, 9, 4, 1], [10, 2, 30, 31]
            peer.send("fill", seed=5)
            await peer.wait_event_async("filled", within=10)
            peer.send("send", room=1, blocks=src, layer_delay_s=0.5)  # streams one layer per 0.5 s
            recv = asyncio.ensure_future(decode.receive("127.0.0.1", peer.ready["port"], 1, dst))
            await until(lambda: decode.poll(1) == KVPoll.Transferring, 10.0)
            peer.kill()
            t0 = time.monotonic()
            with pytest.raises(E.PeerDeadError) as info:
                await asyncio.wait_for(recv, 5.0)
            assert time.monotonic() - t0 < config.dead_after_s + 2.0
            assert info.value.side == "decode" and info.value.phase == "transfer"
            assert decode.pages_held() == 0 and not decode.rooms and not decode.peers
    finally:
        peer.kill()
    assert kv_threads() == before
    assert open_fds() <= fds
    assert not [s for s in list_segments() if s.split("-")[2] == str(os.getpid())]


async def test_decode_killed_after_registering() -> None:
    layout = tiny_layout()
    config = cfg("shm")
    peer = PeerProcess("decode", layout, 32, config)
    segment = peer.ready["backend"]["segment"]
    try:
        async with service_pair(config, layout) as (prefill, _):
            sender = prefill.create_sender(2)
            peer.send("receive", room=2, host="127.0.0.1", port=prefill.bootstrap_port, blocks=[4, 5, 6])
            await sender.wait_ready(10.0)
            sender.set_source([1, 2, 3])
            peer.kill()
            t0 = time.monotonic()
            with pytest.raises(E.PeerDeadError) as info:
                await asyncio.wait_for(sender.finish(AuxData(room=2, first_token_id=0)), 5.0)
            assert time.monotonic() - t0 < config.dead_after_s + 2.0
            assert info.value.side == "prefill"
            assert prefill.pages_held() == 0 and not prefill.rooms
            await until(lambda: prefill.backend.describe()["mapped_segments"] == 0, 2.0)
    finally:
        peer.kill()
    # SIGKILL left the segment behind; any later pool creation on this host sweeps it (possibly
    # another test's already did)
    sweep_stale(Path("/dev/shm"))
    assert segment not in list_segments()


async def test_prefill_restarted_at_the_same_port() -> None:
    layout = tiny_layout()
    config = cfg("tcp", heartbeat_interval_s=0.25, heartbeat_misses=40)  # dead only after 10 s
    first = PeerProcess("prefill", layout, 64, config)
    second: PeerProcess | None = None
    try:
        port = first.ready["port"]
        async with service_pair(config, layout) as (_, decode):
            first.send("hold", room=1)
            await first.wait_event_async("holding", within=10)
            old = asyncio.ensure_future(decode.receive("127.0.0.1", port, 1, [7, 8]))
            await until(lambda: decode.poll(1) == KVPoll.WaitingForInput, 10.0)
            first.kill()
            second = await asyncio.to_thread(PeerProcess, "prefill", layout, 64, config, port=port)
            assert second.ready["incarnation"] != first.ready["incarnation"]
            with pytest.raises(E.PeerRestartedError) as info:
                await asyncio.wait_for(old, 5.0)  # the new incarnation's pong, long before 10 s of silence
            assert second.ready["incarnation"] in info.value.message
            second.send("fill", seed=9)
            await second.wait_event_async("filled", within=10)
            second.send("send", room=2, blocks=[5, 6, 7])
            await decode.receive("127.0.0.1", port, 2, [20, 21, 22])
            second.send("digest", blocks=[5, 6, 7])
            expected = (await second.wait_event_async("digest", within=10))["digest"]
            assert pages_digest(decode.store, [20, 21, 22]) == expected
            assert decode.pages_held() == 0
            assert (await second.wait_event_async("sent", within=10, room=2))["ok"]
    finally:
        first.kill()
        if second is not None:
            closed = second.close()
            assert closed is not None and closed["threads"] <= 3


async def test_decode_restarted_with_the_same_address() -> None:
    layout = tiny_layout()
    config = cfg("tcp", heartbeat_interval_s=0.25, heartbeat_misses=40)
    first = PeerProcess("decode", layout, 32, config, advertise="decode-7:8100")
    second: PeerProcess | None = None
    try:
        async with service_pair(config, layout) as (prefill, _):
            old = prefill.create_sender(1)
            first.send("receive", room=1, host="127.0.0.1", port=prefill.bootstrap_port, blocks=[1, 2])
            await old.wait_ready(10.0)
            first.kill()
            second = await asyncio.to_thread(
                PeerProcess, "decode", layout, 32, config, advertise="decode-7:8100"
            )
            new = prefill.create_sender(2)
            second.send("receive", room=2, host="127.0.0.1", port=prefill.bootstrap_port, blocks=[3, 4, 5])
            await until(lambda: old.poll() == KVPoll.Failed, 5.0)  # at once, not after 10 s of silence
            with pytest.raises(E.PeerRestartedError) as info:
                await asyncio.wait_for(old.finish(AuxData(room=1, first_token_id=0)), 1.0)
            assert info.value.room == 1 and second.ready["incarnation"] in info.value.message
            await new.wait_ready(10.0)
            new.set_source([9, 10, 11])
            await asyncio.wait_for(new.finish(AuxData(room=2, first_token_id=3)), 10.0)
            got = await second.wait_event_async("received", within=10, room=2)
            assert got["ok"] and got["aux"]["first_token_id"] == 3
            assert got["digest"] == pages_digest(prefill.store, [9, 10, 11])
            second.send("stats")
            stats = await second.wait_event_async("stats", within=10)
            assert stats["pages_held"] == 0 and stats["rooms"] == 0
            assert prefill.pages_held() == 0
    finally:
        first.kill()
        if second is not None:
            assert second.close() is not None
