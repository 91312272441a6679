"""KV-transfer errors: typed fields, pickling, wire round trip, HTTP statuses."""

from __future__ import annotations

import pickle

import pytest

from pdserve.engine.kv_layout import LayoutMismatchError
from pdserve.errors import ConfigError, PdserveError
from pdserve.kvtransfer import errors as E

pytestmark = pytest.mark.unit

ALL = [
    E.TransferError,
    E.TransferTimeoutError,
    E.TransferAbortedError,
    E.PeerError,
    E.PeerDeadError,
    E.PeerRestartedError,
    E.HandshakeError,
    E.TransferLayoutMismatchError,
    E.ProtocolError,
    E.ChecksumError,
    E.RoomError,
    E.TransportError,
    E.TransportUnavailableError,
]


@pytest.mark.parametrize("cls", ALL)
def test_fields_survive_pickling(cls: type[E.TransferError]) -> None:
    err = cls("it broke", side="prefill", phase="waiting", room=42)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.side, back.phase, back.reason, back.room) == ("prefill", "waiting", cls.default_reason, 42)
    assert back.message == "it broke"
    assert "[prefill/waiting/" in str(back) and "room=42" in str(back)
    assert isinstance(back, PdserveError)


@pytest.mark.parametrize("cls", ALL)
def test_wire_round_trip(cls: type[E.TransferError]) -> None:
    err = cls("remote failure", side="decode", phase="transfer", room=7)
    back = E.error_from_wire(E.error_to_wire(err), room=7)
    assert type(back) is cls
    assert (back.side, back.phase, back.reason, back.room) == ("decode", "transfer", err.reason, 7)
    assert back.details["remote"] is True


def test_wire_garbage_falls_back_to_base_class() -> None:
    back = E.error_from_wire(
        {"error_type": "os.system", "side": "evil", "phase": "x", "reason": "y"}, room=None
    )
    assert type(back) is E.TransferError
    assert (back.side, back.phase, back.reason) == ("prefill", "transfer", "transport")


def test_statuses_and_hierarchy() -> None:
    assert E.TransferAbortedError("x").http_status == 499
    assert E.TransferTimeoutError("x").http_status == 504
    assert E.TransferError("x").http_status == 500
    mismatch = E.TransferLayoutMismatchError("x")
    assert isinstance(mismatch, LayoutMismatchError) and isinstance(mismatch, ConfigError)
    assert mismatch.reason == "layout_mismatch"
    assert issubclass(E.PeerRestartedError, E.PeerError)
    assert E.TransferError("x", reason="checksum").reason == "checksum"
