"""What the OpenAI layer needs from the process it runs in: a generation backend and a tokenizer.

The layer is backend-agnostic. A worker wraps its local engine, the router wraps its PD
dispatcher; both implement :class:`GenerateBackend` and yield :class:`RequestOutput` deltas whose
``new_text`` is already detokenised and stop-trimmed.

Per-request lifecycle seen by a backend:

1. ``OpenAIServing`` validates the request, renders the prompt, fills a :class:`RequestContext`
   (request id, prompt text, PD bootstrap triple, unknown body fields, deadline) and calls
   ``backend.generate(request_id, prompt_ids, params, ctx=ctx)``.
2. The backend yields deltas; the last one has ``finished=True``.
3. If the client goes away, the serving layer stops iterating, calls ``ctx.cancel()`` and closes
   the iterator (``aclose()``); a backend frees what it holds in its ``finally`` block. Backends
   that wait on something outside the event loop poll ``await ctx.is_cancelled()`` or
   ``await ctx.wait_cancelled(timeout_s)`` and honour ``ctx.time_left()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError, RequestTimeoutError

if TYPE_CHECKING:
    from pdserve.engine.tokenizer import Tokenizer

MAX_BOOTSTRAP_ROOM = 2**63 - 1


@dataclass(frozen=True, slots=True)
class BootstrapInfo:
    """SGLang PD rendezvous name carried by a request: the prefill worker's host and bootstrap port
    and a random room id in ``[0, 2**63 - 1]``. ``port`` may be None (routers send ``null`` when a
    prefill worker has no explicit bootstrap port; the worker then uses its configured default)."""

    host: str
    port: int | None
    room: int

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidRequestError("bootstrap_host must be a non-empty string", param="bootstrap_host")
        if self.port is not None and not 0 < self.port < 65536:
            raise InvalidRequestError(
                f"bootstrap_port must be in [1, 65535], got {self.port}", param="bootstrap_port"
            )
        if not 0 <= self.room <= MAX_BOOTSTRAP_ROOM:
            raise InvalidRequestError(
                f"bootstrap_room must be in [0, 2**63-1], got {self.room}", param="bootstrap_room"
            )

    @classmethod
    def from_fields(cls, host: str | None, port: int | None, room: int | None) -> BootstrapInfo | None:
        """Host and room set -> an instance; nothing set -> None; anything else -> 400."""
        if host is None or room is None:
            if host is None and port is None and room is None:
                return None
            missing = "bootstrap_host" if host is None else "bootstrap_room"
            raise InvalidRequestError(
                f"bootstrap_host and bootstrap_room go together (bootstrap_port optional); missing {missing}",
                param=missing,
            )
        return cls(host=host, port=port, room=room)

    def to_fields(self) -> dict[str, Any]:
        return {"bootstrap_host": self.host, "bootstrap_port": self.port, "bootstrap_room": self.room}


@dataclass(eq=False, slots=True)
class RequestContext:
    """Per-request information a backend may need besides the prompt ids and sampling params.

    ``extras`` holds request body fields this layer does not model (passed through verbatim, e.g.
    ``routed_dp_rank``). ``deadline`` is a ``time.monotonic()`` instant after which the request
    should fail with :class:`RequestTimeoutError`. ``disconnect_check`` is an awaitable hook such as
    Starlette's ``Request.is_disconnected``.
    """

    request_id: str = ""
    prompt_text: str | None = None
    bootstrap: BootstrapInfo | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    deadline: float | None = None
    disconnect_check: Callable[[], Awaitable[bool]] | None = None
    cancel_reason: str | None = None
    _cancel_event: asyncio.Event | None = field(default=None, init=False, repr=False)

    def cancel(self, reason: str = "cancelled") -> None:
        """Mark the request cancelled (idempotent; the first reason wins)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self._cancel_event is not None:
            self._cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    async def is_cancelled(self) -> bool:
        """True once cancelled or the client disconnected (which cancels the context)."""
        if self.cancel_reason is not None:
            return True
        if self.disconnect_check is not None and await self.disconnect_check():
            self.cancel("client disconnected")
            return True
        return False

    async def wait_cancelled(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for :meth:`cancel`; returns whether it happened."""
        if self.cancel_reason is not None:
            return True
        if self._cancel_event is None:
            self._cancel_event = asyncio.Event()
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._cancel_event.wait()
        except TimeoutError:
            return False
        return True

    def time_left(self) -> float | None:
        """Seconds until the deadline (may be negative), or None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        left = self.time_left()
        if left is not None and left <= 0:
            raise RequestTimeoutError(f"request {self.request_id} exceeded its deadline")


class GenerateBackend(Protocol):
    """Runs one generation. An ``async def`` generator function satisfies this protocol."""

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        ctx: RequestContext,
    ) -> AsyncIterator[RequestOutput]: ...


@runtime_checkable
class ChatTokenizer(Protocol):
    """The slice of ``pdserve.engine.tokenizer.Tokenizer`` this layer uses."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str: ...


if TYPE_CHECKING:  # mypy proves the engine's tokenizer satisfies the protocol

    def _tokenizer_conforms(tok: Tokenizer) -> ChatTokenizer:
        return tok
