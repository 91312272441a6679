"""SGLang native /generate: request mapping, writer/parser round trips, SGLang-format streams, SSE."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from pdserve.api.backend import BootstrapInfo
from pdserve.api.native import (
    NativeOutputParser,
    NativeOutputWriter,
    build_generate_request,
    request_to_engine,
)
from pdserve.api.protocol import GenerateRequest
from pdserve.api.responses import GenerateResponse
from pdserve.api.sse import SSE_DONE, SSEDecoder, sse_event
from pdserve.api.testing import CharTokenizer, ScriptedBackend, make_app
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ContextLengthError, WorkerError

pytestmark = pytest.mark.unit

TOK = CharTokenizer()


def deltas(with_logprobs: bool = True) -> list[RequestOutput]:
    pieces = [("He", [10, 11]), ("", []), ("llo", [12, 13, 14]), (" wörld", [15])]
    outs = []
    total = 0
    for i, (text, ids) in enumerate(pieces):
        total += len(ids)
        last = i == len(pieces) - 1
        lps = (
            [TokenLogprob(t, -0.5 * t, [(t, -0.5 * t), (t + 1, -9.0)]) for t in ids]
            if with_logprobs
            else None
        )
        outs.append(
            RequestOutput(
                "r1",
                ids,
                text,
                finished=last,
                finish_reason="stop" if last else None,
                matched_stop=151336 if last else None,
                new_logprobs=lps,
                num_prompt_tokens=7,
                num_output_tokens=total,
                num_cached_tokens=4,
            )
        )
    return outs


def same(a: RequestOutput, b: RequestOutput) -> None:
    assert (a.new_token_ids, a.new_text, a.finished, a.finish_reason, a.matched_stop) == (
        b.new_token_ids,
        b.new_text,
        b.finished,
        b.finish_reason,
        b.matched_stop,
    )
    assert (a.num_prompt_tokens, a.num_output_tokens, a.num_cached_tokens) == (
        b.num_prompt_tokens,
        b.num_output_tokens,
        b.num_cached_tokens,
    )
    assert (a.new_logprobs or []) == (b.new_logprobs or [])


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("mode", ["auto", "forced"])
def test_writer_parser_round_trip(incremental: bool, mode: str) -> None:
    writer = NativeOutputWriter(
        "r1",
        prompt_tokens=7,
        return_logprob=True,
        top_logprobs_num=2,
        token_text=chr,
        incremental=incremental,
    )
    forced = "incremental" if incremental else "cumulative"
    parser = NativeOutputParser("r1", mode=forced if mode == "forced" else "auto")
    originals = deltas()
    wire = b"".join(sse_event(writer.chunk(o)) for o in originals) + SSE_DONE
    chunks = [orjson.loads(ev[6:]) for ev in wire.split(b"\n\n")[:-2]]
    if not incremental:
        assert chunks[-1]["text"] == "Hello wörld" and chunks[2]["output_ids"] == [10, 11, 12, 13, 14]
        assert len(chunks[2]["meta_info"]["output_token_logprobs"]) == 5
    else:
        assert chunks[2]["text"] == "llo" and chunks[2]["output_ids"] == [12, 13, 14]
    for c in chunks:
        GenerateResponse.model_validate(c)
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": 151336}
    assert chunks[0]["meta_info"]["finish_reason"] is None
    assert chunks[0]["meta_info"]["output_token_logprobs"][0] == [-5.0, 10, "\n"]
    rng = random.Random(7)
    got: list[RequestOutput] = []
    i = 0
    while i < len(wire):  # arbitrary byte splits, including inside multi-byte UTF-8
        n = rng.randint(1, 40)
        got.extend(parser.feed_sse(wire[i : i + n]))
        i += n
    got.extend(parser.finish_sse())
    assert parser.done and parser.finished
    assert len(got) == len(originals)
    for a, b in zip(got, originals, strict=True):
        same(a, b)


def test_non_streaming_response_round_trip() -> None:
    writer = NativeOutputWriter("r1", prompt_tokens=7, return_logprob=True, top_logprobs_num=2)
    originals = deltas()
    for o in originals:
        writer.add(o)
    body = writer.response(originals[-1])
    GenerateResponse.model_validate(body)
    assert body["text"] == "Hello wörld" and body["meta_info"]["completion_tokens"] == 6
    assert body["meta_info"]["cached_tokens"] == 4 and "e2e_latency" in body["meta_info"]
    out = NativeOutputParser("r1").feed(orjson.loads(orjson.dumps(body)))
    assert out.new_text == "Hello wörld" and out.new_token_ids == [10, 11, 12, 13, 14, 15]
    assert out.finished and out.finish_reason == "stop" and out.matched_stop == 151336
    assert [lp.token_id for lp in out.new_logprobs or []] == [10, 11, 12, 13, 14, 15]


def test_parses_real_sglang_cumulative_stream() -> None:
    # SGLang's default streaming: cumulative text, output_ids and logprob lists.
    chunks = [
        {
            "text": "The",
            "output_ids": [791],
            "meta_info": {
                "id": "x",
                "finish_reason": None,
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "cached_tokens": 0,
                "output_token_logprobs": [[-0.1, 791, None]],
            },
        },
        {
            "text": "The cap",
            "output_ids": [791, 6864],
            "meta_info": {
                "id": "x",
                "finish_reason": None,
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "cached_tokens": 0,
                "output_token_logprobs": [[-0.1, 791, None], [-0.2, 6864, None]],
            },
        },
        {
            "text": "The capital",
            "output_ids": [791, 6864, 2223],
            "meta_info": {
                "id": "x",
                "finish_reason": {"type": "length", "length": 3},
                "prompt_tokens": 5,
                "completion_tokens": 3,
                "cached_tokens": 2,
                "output_token_logprobs": [[-0.1, 791, None], [-0.2, 6864, None], [-0.3, 2223, None]],
                "e2e_latency": 0.1,
            },
        },
    ]
    parser = NativeOutputParser("x")
    outs = [parser.feed(c) for c in chunks]
    assert [o.new_text for o in outs] == ["The", " cap", "ital"]
    assert [o.new_token_ids for o in outs] == [[791], [6864], [2223]]
    assert [[lp.token_id for lp in o.new_logprobs or []] for o in outs] == [[791], [6864], [2223]]
    assert outs[-1].finish_reason == "length" and outs[-1].num_cached_tokens == 2 and outs[-1].finished


def test_parses_real_sglang_incremental_stream_and_abort() -> None:
    chunks = [
        {
            "text": "A",
            "output_ids": [1],
            "meta_info": {
                "id": "x",
                "finish_reason": None,
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "cached_tokens": 0,
            },
        },
        {
            "text": "B",
            "output_ids": [2],
            "meta_info": {
                "id": "x",
                "finish_reason": None,
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "cached_tokens": 0,
            },
        },
        {
            "text": "",
            "output_ids": [],
            "meta_info": {
                "id": "x",
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "cached_tokens": 0,
                "finish_reason": {"type": "abort", "message": "KV transfer failed", "status_code": 500},
            },
        },
    ]
    parser = NativeOutputParser("x")
    outs = [parser.feed(c) for c in chunks]
    assert "".join(o.new_text for o in outs) == "AB" and [o.new_token_ids for o in outs] == [[1], [2], []]
    assert outs[-1].finish_reason == "abort" and parser.abort_message == "KV transfer failed"


def test_error_chunk_raises_worker_error() -> None:
    parser = NativeOutputParser("x")
    with pytest.raises(WorkerError) as info:
        parser.feed_sse(b'data: {"error": {"message": "boom", "code": 503}}\n\n')
    assert "boom" in info.value.message and info.value.details["worker_status"] == 503
    with pytest.raises(WorkerError):
        parser.feed({"text": "no meta"})


def test_request_round_trip() -> None:
    params = SamplingParams(
        max_tokens=9,
        temperature=0.3,
        top_p=0.8,
        top_k=4,
        min_p=0.05,
        seed=11,
        stop=["</s>"],
        stop_token_ids=[2],
        ignore_eos=True,
        logprobs=3,
        skip_special_tokens=False,
    )
    body = build_generate_request(
        [5, 6, 7],
        params,
        rid="abc",
        stream=True,
        bootstrap=BootstrapInfo("10.0.0.9", 8998, 123),
        incremental=True,
        extras={"routed_dp_rank": 0},
    )
    assert body["bootstrap_host"] == "10.0.0.9" and body["bootstrap_room"] == 123
    assert body["sampling_params"]["max_new_tokens"] == 9 and body["sampling_params"]["sampling_seed"] == 11
    req = GenerateRequest.model_validate(json.loads(json.dumps(body)))
    assert req.model_extra == {"routed_dp_rank": 0} and req.incremental_streaming_output is True
    ids, back = request_to_engine(req, None, model_max_len=100)
    assert ids == [5, 6, 7] and back == params


def test_request_to_engine_defaults_and_limits() -> None:
    req = GenerateRequest.model_validate({"text": "hello"})
    ids, params = request_to_engine(req, TOK, model_max_len=100)
    assert TOK.decode(ids) == "hello" and params.max_tokens == 95 and params.logprobs is None
    ids, params = request_to_engine(req, TOK, model_max_len=1000, default_max_tokens=128)
    assert params.max_tokens == 128
    with pytest.raises(ContextLengthError):
        request_to_engine(req, TOK, model_max_len=5)
    seed_req = GenerateRequest.model_validate(
        {"input_ids": [1], "sampling_params": {"seed": 3}, "return_logprob": True}
    )
    assert request_to_engine(seed_req, None, model_max_len=10)[1].seed == 3
    assert request_to_engine(seed_req, None, model_max_len=10)[1].logprobs == 0


@pytest.mark.parametrize("chunking", [1, 3, 1000])
def test_sse_decoder(chunking: int) -> None:
    raw = b': keep-alive\n\ndata: {"a": 1}\r\n\r\ndata: line1\ndata: line2\n\nevent: x\ndata: [DONE]\n\n'
    dec = SSEDecoder()
    events: list[bytes] = []
    for i in range(0, len(raw), chunking):
        events.extend(dec.feed(raw[i : i + chunking]))
    events.extend(dec.finish())
    assert events == [b'{"a": 1}', b"line1\nline2", b"[DONE]"]
    tail = SSEDecoder()
    assert tail.feed(b"data: unterminated") == [] and tail.finish() == [b"unterminated"]


def _native_client(backend: ScriptedBackend) -> TestClient:
    return TestClient(make_app(backend, TOK, model_max_len=512), raise_server_exceptions=False)


def test_generate_endpoint_non_streaming() -> None:
    backend = ScriptedBackend(TOK, pieces=["ab", "c"], matched_stop=0)
    body: dict[str, Any] = {
        "text": "hi",
        "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        "rid": "n1",
        "return_logprob": True,
        "top_logprobs_num": 1,
        "return_text_in_logprobs": True,
    }
    with _native_client(backend) as c:
        data = c.post("/generate", json=body).json()
    resp = GenerateResponse.model_validate(data)
    assert resp.text == "abc" and resp.meta_info.id == "n1" and resp.meta_info.completion_tokens == 3
    assert resp.meta_info.finish_reason is not None and resp.meta_info.finish_reason.matched == 0
    assert (
        resp.meta_info.output_token_logprobs is not None and resp.meta_info.output_token_logprobs[0][2] == "a"
    )
    assert backend.calls[0].params.max_tokens == 8 and backend.calls[0].params.greedy


@pytest.mark.parametrize("incremental", [None, True])
def test_generate_endpoint_streaming(incremental: bool | None) -> None:
    backend = ScriptedBackend(TOK, pieces=["x", "y", "z"])
    body: dict[str, Any] = {
        "input_ids": [100, 101],
        "stream": True,
        "bootstrap_host": "h",
        "bootstrap_room": 5,
    }
    if incremental is not None:
        body["incremental_streaming_output"] = incremental
    with _native_client(backend) as c:
        raw = c.post("/generate", json=body).content
    assert raw.endswith(SSE_DONE)
    texts = [json.loads(ev[6:])["text"] for ev in raw.split(b"\n\n")[:-2]]
    assert texts == (["x", "y", "z"] if incremental else ["x", "xy", "xyz"])
    parser = NativeOutputParser("r")
    outs = parser.feed_sse(raw) + parser.finish_sse()
    assert "".join(o.new_text for o in outs) == "xyz" and outs[-1].finished and parser.done
    ctx = backend.calls[0].ctx
    assert ctx.bootstrap == BootstrapInfo("h", None, 5)


def test_generate_endpoint_abort_is_502() -> None:
    with _native_client(ScriptedBackend(TOK, pieces=["a"], finish_reason="abort")) as c:
        assert c.post("/generate", json={"text": "x"}).status_code == 502
