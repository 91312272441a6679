"""Per-room states: ordered, monotone, Failed wins, terminal states stick."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pdserve.kvtransfer.errors import TransferAbortedError, TransferError
from pdserve.kvtransfer.metrics import TransferMetrics
from pdserve.kvtransfer.states import KVPoll, RoomState

pytestmark = pytest.mark.unit


def test_order_matches_sglang() -> None:
    assert [s.value for s in KVPoll] == [0, 1, 2, 3, 4]
    assert min(KVPoll.Success, KVPoll.Failed, KVPoll.Transferring) == KVPoll.Failed
    assert KVPoll.Bootstrapping.phase == "bootstrap" and KVPoll.WaitingForInput.phase == "waiting"


def test_only_forward() -> None:
    st = RoomState()
    assert st.value == KVPoll.Bootstrapping
    assert st.advance(KVPoll.Transferring)
    assert not st.advance(KVPoll.WaitingForInput)
    assert st.value == KVPoll.Transferring
    assert st.advance(KVPoll.Success)
    assert not st.fail(TransferAbortedError("late"))
    assert st.value == KVPoll.Success and st.error is None


def test_failed_wins_and_sticks() -> None:
    st = RoomState()
    st.advance(KVPoll.WaitingForInput)
    err = TransferAbortedError("stop", room=1)
    assert st.fail(err)
    assert st.value == KVPoll.Failed and st.error is err
    assert not st.advance(KVPoll.Success)
    assert not st.fail(TransferAbortedError("again"))
    assert st.error is err
    with pytest.raises(TransferError):
        st.advance(KVPoll.Failed)


def test_metrics_count_open_rooms_by_state() -> None:
    reg = CollectorRegistry()
    m = TransferMetrics(reg, side="decode", transport="tcp")

    def gauge(state: str) -> float:
        v = reg.get_sample_value("pdserve:kv_transfer_rooms", {"side": "decode", "state": state})
        return float(v or 0.0)

    a, b = RoomState(m.on_state), RoomState(m.on_state)
    assert gauge("Bootstrapping") == 2
    a.advance(KVPoll.Transferring)
    assert gauge("Bootstrapping") == 1 and gauge("Transferring") == 1
    a.advance(KVPoll.Success)
    b.fail(TransferAbortedError("x"))
    assert gauge("Bootstrapping") == 0 and gauge("Transferring") == 0
    assert reg.get_sample_value("pdserve:kv_transfer_info", {"side": "decode", "transport": "tcp"}) == 1
