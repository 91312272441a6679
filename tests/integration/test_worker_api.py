"""One colocated (``both``) worker process: the endpoints routers expect, and bad input answered
with an OpenAI-format 4xx — never a 5xx, never a stuck request.

The worker runs with a 256-token context and a 64 KiB body limit so the limits are cheap to hit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.decode_worker.testing import WorkerProcess, spawn_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONTEXT = 256
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def worker(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    args = ["--model", str(default_model_dir), "--num-blocks", "64", "--max-model-len", str(CONTEXT),
            "--max-body-bytes", str(BODY_LIMIT), "--served-model-name", "glm-tiny"]  # fmt: skip
    w = spawn_worker("both", tmp_path_factory.mktemp("worker-api-logs"), extra_args=args)
    try:
        w.wait_ready(180.0)
        yield w
    finally:
        w.stop()


@pytest.fixture
async def client(worker: WorkerProcess) -> Any:
    async with httpx.AsyncClient(base_url=worker.url, timeout=30.0) as c:
        yield c


def _is_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == status and isinstance(err["type"], str)
    return dict(err)


async def test_identity_endpoints(client: httpx.AsyncClient, default_model_dir: Path) -> None:
    assert (await client.get("/health")).json()["status"] == "ok"
    assert (await client.get("/health_generate")).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert [(m["id"], m["owned_by"], m["max_model_len"]) for m in models["data"]] == [
        ("glm-tiny", "sglang", CONTEXT)
    ]
    info = (await client.get("/get_model_info")).json()
    assert info["model_path"] == str(default_model_dir.resolve())  # noqa: ASYNC240
    assert os.path.isdir(info["model_path"])  # noqa: ASYNC240
    assert info["is_generation"] is True
    server = (await client.get("/get_server_info")).json()
    assert server["role"] == "both" and server["disaggregation_mode"] == "null"
    assert server["context_length"] == CONTEXT and server["page_size"] == 16
    assert server["max_total_num_tokens"] == 64 * 16
    assert (await client.get("/version")).json()["version"]


async def test_load_endpoints(client: httpx.AsyncClient) -> None:
    for path in ("/get_load", "/load"):
        (load,) = (await client.get(path)).json()
        for key in ("num_waiting_reqs", "num_running_reqs", "waiting_prefill_tokens", "free_kv_blocks",
                    "total_kv_blocks", "kv_usage", "transport", "num_reqs", "num_tokens"):  # fmt: skip
            assert key in load, key
        assert load["total_kv_blocks"] == 64 and 0.0 <= load["kv_usage"] <= 1.0


async def test_generation_and_metrics(client: httpx.AsyncClient) -> None:
    body = {
        "model": "glm-tiny",
        "prompt": "hello world",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    text = (await client.get("/metrics")).text
    assert 'pdserve:worker_requests_total{leg="local",outcome="ok"}' in text
    assert 'pdserve:worker_http_responses_total{code="2xx",path="/v1/completions"}' in text
    families = [
        "pdserve:worker_ttft_seconds", "pdserve:worker_e2e_latency_seconds", "pdserve:engine_steps_total",
        "pdserve:worker_inter_token_latency_seconds", "pdserve:worker_queue_depth",
        "pdserve:worker_kv_blocks", "pdserve:worker_kv_usage_ratio",
    ]  # fmt: skip
    for family in families:
        assert family in text, family
    assert (await client.post("/abort_request", json={"rid": "nobody"})).json() == {"aborted": 0}
    assert (await client.post("/abort_request", json={"abort_all": True})).json() == {"aborted": 0}
    _is_openai_error(await client.post("/abort_request", json={"abort_all": "yes"}), 400)


LONG = "word " * 400  # > CONTEXT tokens


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", b'{"model": "glm-tiny", "messages": [', 400, None),
        ("/v1/chat/completions", b"[]", 400, None),
        ("/v1/chat/completions", {"model": "glm-tiny"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ("/v1/completions", {"model": "glm-tiny"}, 400, "prompt"),
        ("/generate", {"sampling_params": {"max_new_tokens": 2}}, 400, "text"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
         "model"),
        ("/v1/completions", {"model": "glm-tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ("/v1/completions", {"model": "glm-tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "glm-tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "glm-tiny", "prompt": "hi", "n": 3}, 400, "n"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, 400, None),
        ("/generate", {"input_ids": [1, 2, 10**7]}, 400, None),
        ("/v1/completions", {"model": "glm-tiny", "prompt": LONG, "max_tokens": 4}, 400, None),
        ("/v1/completions", {"model": "glm-tiny", "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
        ("/generate", {"input_ids": [5] * CONTEXT}, 400, "input_ids"),
        ("/v1/chat/completions", {"model": "glm-tiny", "messages": [{"role": "user", "content": LONG}]}, 400,
         None),
        (
            "/v1/chat/completions",
            {"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}],
             "tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]},
            400,
            "tools[0].function.name",
        ),
        (
            "/v1/chat/completions",
            {"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}],
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            400,
            "tool_choice",
        ),
    ],
)  # fmt: skip
async def test_bad_input_is_an_openai_4xx(
    client: httpx.AsyncClient, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        resp = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = await client.post(path, json=body)
    err = _is_openai_error(resp, status)
    if param is not None:
        assert err["param"] == param, err


async def test_oversize_bodies_are_413(client: httpx.AsyncClient) -> None:
    big = b'{"model": "glm-tiny", "prompt": "' + b"x" * BODY_LIMIT + b'"}'
    _is_openai_error(await client.post("/v1/completions", content=big), 413)

    async def chunks() -> Any:  # no Content-Length: counted as it streams in
        for _ in range(8):
            yield b"y" * (BODY_LIMIT // 4)

    _is_openai_error(await client.post("/v1/completions", content=chunks()), 413)


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    _is_openai_error(await client.get("/no/such/route"), 404)
    _is_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_stock_openai_client_sees_typed_errors(worker: WorkerProcess) -> None:
    import openai

    oai = openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0, timeout=30.0)
    try:
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            await oai.completions.create(model="glm-tiny", prompt="hi", temperature=3.5)
        with pytest.raises(openai.BadRequestError):
            await oai.completions.create(model="glm-tiny", prompt=LONG, max_tokens=4)
        ok = await oai.chat.completions.create(
            model="glm-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert ok.choices[0].finish_reason in ("length", "stop")
    finally:
        await oai.close()


async def test_a_burst_of_bad_requests_leaves_nothing_stuck(client: httpx.AsyncClient) -> None:
    bad = [
        client.post("/v1/completions", json={"model": "glm-tiny", "prompt": LONG, "max_tokens": 2}),
        client.post("/generate", content=b"{nope", headers={"content-type": "application/json"}),
        client.post("/v1/completions", json={"model": "glm-tiny", "prompt": "hi", "temperature": -2}),
    ] * 10
    good = [
        client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}})
        for _ in range(4)
    ]
    responses = await asyncio.wait_for(asyncio.gather(*bad, *good), 60.0)
    assert all(400 <= r.status_code < 500 for r in responses[: len(bad)])
    assert all(r.status_code == 200 for r in responses[len(bad) :])
    (load,) = (await client.get("/get_load")).json()
    assert load["num_running_reqs"] == load["num_waiting_reqs"] == 0
    assert load["free_kv_blocks"] == load["total_kv_blocks"]


async def test_sigterm_finishes_in_flight_requests_then_exits(worker: WorkerProcess) -> None:
    """Runs last: graceful shutdown lets a streaming request finish, then exits with status 0."""
    body = {"input_ids": [5, 6, 7, 8], "stream": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    async with (
        httpx.AsyncClient(timeout=60.0) as client,
        client.stream("POST", worker.url + "/generate", json=body) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        os.killpg(worker.proc.pid, 15)
        rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"length"' in rest[-2]
    assert await asyncio.to_thread(worker.proc.wait, 30.0) == 0
