"""Prefill-side job planning: which page rectangles become ready, in what order, done last."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.sender import SendRoom

pytestmark = pytest.mark.unit


def _room(layers: int = 4, n: int = 6) -> SendRoom:
    loop = asyncio.new_event_loop()
    try:
        room = SendRoom(1, layers, loop, lambda old, new: None)
    finally:
        loop.close()
    room.src = np.arange(n)
    room.dst = np.arange(n) + 10
    return room


def test_nothing_before_the_destination_is_known() -> None:
    room = _room()
    room.dst = None
    room.ready[:] = 100
    assert room.take_jobs() == ([], False)


def test_layer_streaming_then_finish() -> None:
    room = _room()
    room.ready[0] = 100
    assert room.take_jobs() == ([(0, 1, 0, 6)], False)
    room.ready[1] = 3  # chunked prefill: the first 3 pages of layer 1 are final
    room.ready[2] = 3
    assert room.take_jobs() == ([(1, 3, 0, 3)], False)
    assert room.take_jobs() == ([], False)
    room.aux = AuxData(room=1, first_token_id=0)
    room.ready[:] = 100
    rects, done = room.take_jobs()
    assert rects == [(1, 3, 3, 6), (3, 4, 0, 6)] and done
    assert room.take_jobs() == ([], False)  # done is queued exactly once


def test_whole_room_is_one_rectangle_and_cancel_stops_everything() -> None:
    room = _room()
    room.aux = AuxData(room=1, first_token_id=0)
    room.ready[:] = 100
    assert room.take_jobs() == ([(0, 4, 0, 6)], True)
    other = _room()
    other.cancel.set()
    other.ready[:] = 100
    assert other.take_jobs() == ([], False)
