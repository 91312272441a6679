"""Wire formats: round trips and refusal of garbage."""

from __future__ import annotations

import json

import pytest

from pdserve.kvtransfer import protocol as P
from pdserve.kvtransfer.errors import ProtocolError

pytestmark = pytest.mark.unit

INC = "ab" * 16


def _register(**over: object) -> dict[str, object]:
    msg: dict[str, object] = {
        "t": "register",
        "room": 5,
        "decode_inc": INC,
        "decode_addr": "d:1",
        "layout": {"num_layers": 2},
        "transport": "tcp",
        "dst_blocks": [1, 2],
        "endpoint": {"data_addr": "tcp://x:1"},
        "checksum": False,
    }
    msg.update(over)
    return msg


def test_round_trips() -> None:
    aux = P.AuxData(
        room=9,
        first_token_id=3,
        first_token_logprob=-0.25,
        cached_tokens=2,
        top_logprobs=((3, -0.25), (4, -2.0)),
    )
    done = P.Done(room=9, prefill_inc=INC, aux=aux, num_pages=3, nbytes=10, checksums=[1, 2])
    assert P.decode_to_decode(P.encode(done)) == done
    reg = P.Register.model_validate(_register())
    assert P.decode_to_prefill(P.encode(reg)) == reg
    plan = P.NcclPlan(room=1, prefill_inc=INC, layers=(0, 2), groups=[(0, 4), (4, 1)])
    assert P.decode_to_decode(P.encode(plan)) == plan


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"PDKV1"],
        [b"XXXX", b"{}"],
        [P.CONTROL_MAGIC, b"not json"],
        [P.CONTROL_MAGIC, b"{}"],
        [P.CONTROL_MAGIC, json.dumps(_register(room=-1)).encode()],
        [P.CONTROL_MAGIC, json.dumps(_register(room=2**63)).encode()],
        [P.CONTROL_MAGIC, json.dumps(_register(extra=1)).encode()],
        [P.CONTROL_MAGIC, json.dumps(_register(decode_inc="short")).encode()],
        [P.CONTROL_MAGIC, json.dumps(_register(dst_blocks=[])).encode()],
        [P.CONTROL_MAGIC, json.dumps(_register(room="5")).encode()],
        [
            P.CONTROL_MAGIC,
            json.dumps({"t": "ack", "room": 1, "prefill_inc": INC}).encode(),
        ],  # wrong direction
        [P.CONTROL_MAGIC, b"{}", b"extra"],
    ],
)
def test_garbage_is_a_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        P.decode_to_prefill(frames)


def test_data_header() -> None:
    raw = P.pack_data_header(P.DATA_KIND_PAGES, 77, INC, 3, 10, 4)
    assert P.unpack_data_header(raw) == (P.DATA_KIND_PAGES, 77, INC, 3, 10, 4)
    for bad in (raw[:-1], b"x" * len(raw), raw[:8] + b"\x09" + raw[9:]):
        with pytest.raises(ProtocolError):
            P.unpack_data_header(bad)
    with pytest.raises(ProtocolError):
        P.decode_done(b'{"t":"done"}')
