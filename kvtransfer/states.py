"""Per-room transfer state: an ordered enum whose transitions only move forward.

``Failed < Bootstrapping < WaitingForInput < Transferring < Success`` (SGLang's ``KVPoll``), so
the minimum over tensor-parallel ranks is the consensus state. Rules enforced by
:class:`RoomState`:

1. a room starts in ``Bootstrapping``;
2. ``advance(s)`` moves to ``s`` only if ``s`` is later than the current state;
3. ``fail(err)`` always wins over a non-terminal state and records the typed error;
4. ``Success`` and ``Failed`` are terminal: nothing moves a room out of them.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from pdserve.kvtransfer.errors import TransferError


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4

    @property
    def phase(self) -> str:
        """The phase a room in this state is in (the label used in errors and metrics)."""
        return _PHASES[self]

    @property
    def terminal(self) -> bool:
        return self in (KVPoll.Failed, KVPoll.Success)


_PHASES = {
    KVPoll.Failed: "transfer",
    KVPoll.Bootstrapping: "bootstrap",
    KVPoll.WaitingForInput: "waiting",
    KVPoll.Transferring: "transfer",
    KVPoll.Success: "transfer",
}

StateListener = Callable[[KVPoll | None, KVPoll], None]


class RoomState:
    """The monotone state of one room. Not thread-safe: owned by the service's event loop."""

    __slots__ = ("error", "listener", "value")

    def __init__(self, listener: StateListener | None = None) -> None:
        self.value = KVPoll.Bootstrapping
        self.error: TransferError | None = None
        self.listener = listener
        if listener is not None:
            listener(None, self.value)

    @property
    def phase(self) -> str:
        return self.value.phase

    def advance(self, new: KVPoll) -> bool:
        """Move forward to ``new``; returns whether the state changed."""
        if new == KVPoll.Failed:
            raise TransferError("internal error: RoomState.advance(Failed); rooms fail through fail()")
        if self.value.terminal or new <= self.value:
            return False
        self._set(new)
        return True

    def fail(self, error: TransferError) -> bool:
        """Fail the room (unless already terminal); returns whether the state changed."""
        if self.value.terminal:
            return False
        self.error = error
        self._set(KVPoll.Failed)
        return True

    def _set(self, new: KVPoll) -> None:
        old, self.value = self.value, new
        if self.listener is not None:
            self.listener(old, new)
