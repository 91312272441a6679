"""TransferConfig: defaults in seconds, forbidden extras, cross-field checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdserve.kvtransfer.config import TransferConfig

pytestmark = pytest.mark.unit


def test_defaults_are_seconds_not_minutes() -> None:
    cfg = TransferConfig()
    assert cfg.transport == "tcp"
    assert cfg.bootstrap_timeout_s < 300 and cfg.waiting_timeout_s < 300
    assert cfg.dead_after_s == cfg.heartbeat_interval_s * cfg.heartbeat_misses <= 5
    assert cfg.timeout_for("bootstrap") == cfg.bootstrap_timeout_s
    assert cfg.timeout_for("waiting") == cfg.waiting_timeout_s
    assert cfg.timeout_for("transfer") == cfg.transfer_timeout_s


@pytest.mark.parametrize(
    "bad",
    [
        {"transport": "rdma"},
        {"bootstrap_timeout_s": 0},
        {"heartbeat_misses": 0},
        {"unknown_knob": 1},
        {"transport": "shm", "device": "cuda:0"},
        {"frame_pages": 0},
    ],
)
def test_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TransferConfig.model_validate(bad)


def test_round_trips_through_json() -> None:
    cfg = TransferConfig(transport="shm", checksum=True, heartbeat_interval_s=0.1)
    assert TransferConfig.model_validate_json(cfg.model_dump_json()) == cfg
