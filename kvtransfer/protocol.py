"""Wire formats: control messages (decode <-> prefill bootstrap endpoint) and data-frame headers.

Control plane: the decode side's DEALER socket (routing id = its incarnation) talks to the
prefill side's ROUTER socket bound on the bootstrap port. Every message is two frames
``[CONTROL_MAGIC, json]`` validated against a strict pydantic schema (unknown fields, wrong
types, out-of-range rooms -> :class:`ProtocolError`); nothing from the wire is trusted.

====================  =========  ============================================================
message               direction  meaning
====================  =========  ============================================================
``register``          D -> P     room, decode incarnation/address, layout, transport, dst pages,
                                 data endpoint (tcp address / shm segment / nccl), checksum on?
``ack``               P -> D     registration accepted by prefill incarnation ``prefill_inc``
``ping`` / ``pong``   D <-> P    heartbeat; the pong names the prefill incarnation
``begin``             P -> D     the first page of the room is moving (shm, nccl)
``nccl``              P -> D     the next NCCL sends, in issue order (decode posts recvs)
``done``              P -> D     all pages written + aux data (tcp sends it on the data socket)
``confirm``           D -> P     decode verified the pages (counts, checksums): Success
``failed``            P -> D     prefill failed the room (phase, reason, typed error)
``abort``             D -> P     decode failed/aborted the room
``abort_ack``         P -> D     prefill stopped touching the room's destination pages
====================  =========  ============================================================

A room's happy path, in order: (1) ``register`` (decode reserved its pages), (2) ``ack``,
(3) ``begin`` and the pages (shm: written into the decode's segment; tcp: data frames; nccl:
``nccl`` plans, then sends), (4) ``done`` with the aux data, (5) ``confirm`` after the decode
verified. Any side may end it early with ``failed``/``abort`` (answered by ``abort_ack``);
``ping``/``pong`` run beside it while the decode has rooms open with that prefill.

Data plane (tcp): multipart ``[header, K frame, V frame]`` per (room, layer, position group),
then ``[header(kind=DONE), done json]``. The header (:data:`DATA_HEADER`) carries the room, the
decode incarnation it is meant for, the layer and the position range; the decode side maps
positions to its own registered page ids, so a sender can never write outside them.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pdserve.kvtransfer.errors import ProtocolError

CONTROL_MAGIC = b"PDKV1"
DATA_MAGIC = b"PDKVDAT1"
DATA_KIND_PAGES = 1
DATA_KIND_DONE = 2
# magic, kind, room, decode incarnation (16 raw bytes), layer, first position, page count
DATA_HEADER = struct.Struct("<8sB3xQ16sIII")
MAX_ROOM = (1 << 63) - 1
MAX_CONTROL_BYTES = 64 << 20

Room = Annotated[int, Field(ge=0, le=MAX_ROOM)]
Inc = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Text = Annotated[str, Field(max_length=4096)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AuxData(_Wire):
    """What the prefill hands the decode with the pages: enough to continue without a forward."""

    room: Room
    first_token_id: Annotated[int, Field(ge=0)]
    first_token_logprob: float | None = None
    cached_tokens: Annotated[int, Field(ge=0)] = 0
    top_logprobs: tuple[tuple[int, float], ...] = ()


class WireError(_Wire):
    error_type: Annotated[str, Field(max_length=64)]
    message: Text
    side: Literal["prefill", "decode"]
    phase: Annotated[str, Field(max_length=32)]
    reason: Annotated[str, Field(max_length=32)]


class Register(_Wire):
    t: Literal["register"] = "register"
    room: Room
    decode_inc: Inc
    decode_addr: Text
    layout: dict[str, int | str]
    transport: Literal["shm", "tcp", "nccl", "fake"]
    dst_blocks: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1 << 20)]
    endpoint: dict[str, int | str]
    checksum: bool


class Ack(_Wire):
    t: Literal["ack"] = "ack"
    room: Room
    prefill_inc: Inc
    endpoint: dict[str, int | str] = Field(default_factory=dict)


class Ping(_Wire):
    t: Literal["ping"] = "ping"
    decode_inc: Inc
    decode_addr: Text


class Pong(_Wire):
    t: Literal["pong"] = "pong"
    prefill_inc: Inc


class Begin(_Wire):
    t: Literal["begin"] = "begin"
    room: Room
    prefill_inc: Inc


class NcclPlan(_Wire):
    t: Literal["nccl"] = "nccl"
    room: Room
    prefill_inc: Inc
    layers: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
    groups: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]]


class Done(_Wire):
    t: Literal["done"] = "done"
    room: Room
    prefill_inc: Inc
    aux: AuxData
    num_pages: Annotated[int, Field(ge=1)]
    nbytes: Annotated[int, Field(ge=0)]
    checksums: list[Annotated[int, Field(ge=0, le=0xFFFFFFFF)]] | None = None


class Confirm(_Wire):
    t: Literal["confirm"] = "confirm"
    room: Room
    decode_inc: Inc
    prefill_inc: Inc


class Failed(_Wire):
    t: Literal["failed"] = "failed"
    room: Room
    prefill_inc: Inc
    error: WireError


class Abort(_Wire):
    t: Literal["abort"] = "abort"
    room: Room
    decode_inc: Inc
    error: WireError


class AbortAck(_Wire):
    t: Literal["abort_ack"] = "abort_ack"
    room: Room
    prefill_inc: Inc


ToPrefill = Annotated[Register | Ping | Confirm | Abort, Field(discriminator="t")]
ToDecode = Annotated[Ack | Pong | Begin | NcclPlan | Done | Failed | AbortAck, Field(discriminator="t")]
_TO_PREFILL: TypeAdapter[Register | Ping | Confirm | Abort] = TypeAdapter(ToPrefill)
_TO_DECODE: TypeAdapter[Ack | Pong | Begin | NcclPlan | Done | Failed | AbortAck] = TypeAdapter(ToDecode)
_DONE: TypeAdapter[Done] = TypeAdapter(Done)


def encode(msg: _Wire) -> list[bytes]:
    return [CONTROL_MAGIC, msg.model_dump_json().encode()]


def _payload(frames: list[bytes], side: str) -> bytes:
    if len(frames) != 2 or frames[0] != CONTROL_MAGIC:
        raise ProtocolError(
            f"malformed control message ({len(frames)} frames, magic {frames[0][:8]!r})"
            if frames
            else "empty control message",
            side=side,
            phase="transfer",
        )
    if len(frames[1]) > MAX_CONTROL_BYTES:
        raise ProtocolError("control message too large", side=side, phase="transfer")
    return frames[1]


def decode_to_prefill(frames: list[bytes]) -> Register | Ping | Confirm | Abort:
    """Parse a message received by the prefill side (raises :class:`ProtocolError`)."""
    try:
        return _TO_PREFILL.validate_json(_payload(frames, "prefill"))
    except ValidationError as exc:
        raise ProtocolError(
            f"invalid control message: {_brief(exc)}", side="prefill", phase="transfer"
        ) from exc


def decode_to_decode(frames: list[bytes]) -> Ack | Pong | Begin | NcclPlan | Done | Failed | AbortAck:
    """Parse a message received by the decode side (raises :class:`ProtocolError`)."""
    try:
        return _TO_DECODE.validate_json(_payload(frames, "decode"))
    except ValidationError as exc:
        raise ProtocolError(
            f"invalid control message: {_brief(exc)}", side="decode", phase="transfer"
        ) from exc


def decode_done(payload: bytes) -> Done:
    try:
        return _DONE.validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid done frame: {_brief(exc)}", side="decode", phase="transfer") from exc


def _brief(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    first = errs[0] if errs else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first["loc"]) or "<message>"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first['msg']}{more}"


def pack_data_header(kind: int, room: int, decode_inc: str, layer: int, pos: int, n: int) -> bytes:
    return DATA_HEADER.pack(DATA_MAGIC, kind, room, bytes.fromhex(decode_inc), layer, pos, n)


def unpack_data_header(frame: bytes) -> tuple[int, int, str, int, int, int]:
    """``(kind, room, decode_inc, layer, pos, n)``; raises :class:`ProtocolError` on garbage."""
    if len(frame) != DATA_HEADER.size:
        raise ProtocolError(
            f"data header of {len(frame)} bytes, expected {DATA_HEADER.size}", side="decode", phase="transfer"
        )
    magic, kind, room, inc, layer, pos, n = DATA_HEADER.unpack(frame)
    if magic != DATA_MAGIC or kind not in (DATA_KIND_PAGES, DATA_KIND_DONE) or room > MAX_ROOM:
        raise ProtocolError("data header with bad magic, kind or room", side="decode", phase="transfer")
    return int(kind), int(room), bytes(inc).hex(), int(layer), int(pos), int(n)


def aux_to_json(aux: AuxData) -> dict[str, Any]:
    return aux.model_dump(mode="json")
