"""KV-transfer errors: every failure says which side, which phase and why.

::

    PdserveError
    └── TransferError (500)                  side, phase, reason, room (all in ``details``)
        ├── TransferTimeoutError (504)       a phase ran past its timeout        reason=timeout
        ├── TransferAbortedError (499)       aborted by the worker on either side reason=aborted
        ├── PeerError (502)                  the other side is gone or is not who we think
        │   ├── PeerDeadError                heartbeats stopped / endpoint never answered
        │   └── PeerRestartedError           a new incarnation answered at the same address
        ├── HandshakeError (400)             the two sides cannot work together
        │   └── TransferLayoutMismatchError  KV layouts differ (also a kv_layout.LayoutMismatchError)
        ├── ProtocolError (502)              garbage, truncated or out-of-order messages/frames
        ├── ChecksumError (502)              the bytes that arrived are not the bytes that were sent
        ├── RoomError (400)                  a bad room id, duplicate room or bad page ids
        └── TransportError (500)             the data path itself failed (socket, shm, NCCL)
            └── TransportUnavailableError    the configured transport cannot run here (no libnccl, ...)

``side`` is ``"prefill"`` or ``"decode"`` (the side that detected the failure), ``phase`` one of
:data:`PHASES`, ``reason`` one of :data:`REASONS` (a low-cardinality label used in metrics).
All fields live in ``details`` so instances survive pickling (Ray ships exceptions between
processes) and can be rebuilt from the wire (:func:`error_from_wire`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pdserve.engine.kv_layout import LayoutMismatchError
from pdserve.errors import PdserveError

SIDES = ("prefill", "decode")
PHASES = ("setup", "bootstrap", "waiting", "transfer", "verify")
REASONS = (
    "timeout",
    "aborted",
    "peer_dead",
    "peer_restarted",
    "layout_mismatch",
    "handshake",
    "protocol",
    "checksum",
    "room",
    "transport",
    "shutdown",
)


class TransferError(PdserveError):
    """Base of every KV-transfer failure."""

    http_status = 500
    err_type = "kv_transfer_error"
    default_reason: ClassVar[str] = "transport"

    def __init__(
        self,
        message: str,
        *,
        side: str = "decode",
        phase: str = "transfer",
        reason: str | None = None,
        room: int | None = None,
        **details: Any,
    ) -> None:
        super().__init__(
            message, side=side, phase=phase, reason=reason or self.default_reason, room=room, **details
        )

    @property
    def side(self) -> str:
        return str(self.details.get("side", "decode"))

    @property
    def phase(self) -> str:
        return str(self.details.get("phase", "transfer"))

    @property
    def reason(self) -> str:
        return str(self.details.get("reason", self.default_reason))

    @property
    def room(self) -> int | None:
        room = self.details.get("room")
        return room if isinstance(room, int) else None

    def __str__(self) -> str:
        room = "" if self.room is None else f" room={self.room}"
        return f"[{self.side}/{self.phase}/{self.reason}{room}] {self.message}"


class TransferTimeoutError(TransferError):
    http_status = 504
    err_type = "timeout_error"
    default_reason = "timeout"


class TransferAbortedError(TransferError):
    http_status = 499
    err_type = "aborted"
    default_reason = "aborted"


class PeerError(TransferError):
    http_status = 502
    default_reason = "peer_dead"


class PeerDeadError(PeerError):
    default_reason = "peer_dead"


class PeerRestartedError(PeerError):
    default_reason = "peer_restarted"


class HandshakeError(TransferError):
    http_status = 400
    err_type = "config_error"
    default_reason = "handshake"


class TransferLayoutMismatchError(HandshakeError, LayoutMismatchError):
    default_reason = "layout_mismatch"


class ProtocolError(TransferError):
    http_status = 502
    default_reason = "protocol"


class ChecksumError(TransferError):
    http_status = 502
    default_reason = "checksum"


class RoomError(TransferError):
    http_status = 400
    err_type = "invalid_request_error"
    default_reason = "room"


class TransportError(TransferError):
    default_reason = "transport"


class TransportUnavailableError(TransportError):
    """The configured transport cannot run on this machine (missing library, no GPU, ...)."""

    default_reason = "transport"


_BY_NAME: dict[str, type[TransferError]] = {
    cls.__name__: cls
    for cls in (
        TransferError,
        TransferTimeoutError,
        TransferAbortedError,
        PeerError,
        PeerDeadError,
        PeerRestartedError,
        HandshakeError,
        TransferLayoutMismatchError,
        ProtocolError,
        ChecksumError,
        RoomError,
        TransportError,
        TransportUnavailableError,
    )
}


def error_to_wire(err: TransferError) -> dict[str, Any]:
    """The JSON-safe form sent to the other side (``error_from_wire`` rebuilds it)."""
    return {
        "error_type": type(err).__name__,
        "message": err.message,
        "side": err.side,
        "phase": err.phase,
        "reason": err.reason,
    }


def error_from_wire(data: dict[str, Any], *, room: int | None) -> TransferError:
    """Rebuild a peer's error; unknown class names fall back to :class:`TransferError`."""
    cls = _BY_NAME.get(str(data.get("error_type")), TransferError)
    side = str(data.get("side", "prefill"))
    phase = str(data.get("phase", "transfer"))
    reason = str(data.get("reason", cls.default_reason))
    return cls(
        str(data.get("message", "peer reported a failure")),
        side=side if side in SIDES else "prefill",
        phase=phase if phase in PHASES else "transfer",
        reason=reason if reason in REASONS else cls.default_reason,
        room=room,
        remote=True,
    )
