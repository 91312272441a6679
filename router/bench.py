"""``pdserve bench serve``: serving latency and the router's own cost, in one run.

With no ``--router-url`` it starts, on 127.0.0.1 only: a fake prefill and a fake decode worker
(router/fake_worker.py), the pdserve router, and sglang-router (``smg``) in ``--pd-disaggregation``
mode in front of the same workers. Phases (each bounded in requests and seconds):

1. HTTP client cost: httpx vs aiohttp vs the router's raw client, sequential, CPU/request.
2. Sequential latency, interleaved: direct PD dispatch by the client vs pdserve router vs smg
   -> the router's added latency (p50/p99 difference to direct).
3. Max throughput (closed loop) and router CPU time per request (process CPU delta / requests),
   for pdserve and smg, non-streamed and streamed.
4. Time to first chunk on a reused keep-alive connection.
5. Serving profile against the pdserve router with a token delay: TTFT, ITL, throughput.

The last printed line is one JSON object (router_added_latency_ms, router_cpu_vs_sglang_router,...).
With ``--router-url`` only phase 5 runs, against that router.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from pdserve.router.bench_util import (
    Run,
    Target,
    closed_loop,
    cpu_seconds,
    fake_worker_cmd,
    first_chunk_reused,
    free_port,
    one_request,
    pct,
    spawn,
    stop,
    wait_ready,
)
from pdserve.router.upstream import Addr, HttpClient

LOCAL = "127.0.0.1"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router-url", default=None, help="benchmark this running router (phase 5 only)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per throughput phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=300, help="sequential requests per target")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--token-delay", type=float, default=0.002,
                        help="phase 5 fake decode delay (s/token)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per phase, at most")
    parser.add_argument("--no-smg", action="store_true", help="skip sglang-router")
    parser.add_argument("--workdir", default=None, help="where process logs go (default: a temp dir)")


def _body(args: argparse.Namespace, stream: bool, offset: int = 0) -> dict[str, Any]:
    ids = [(offset + i) % 5000 + 1 for i in range(args.prompt_tokens)]
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": args.max_new_tokens}, "stream": stream}


async def _client_cost(addr: Addr, body: dict[str, Any], n: int) -> dict[str, dict[str, float]]:
    """CPU per request of this process for each HTTP client (same requests, sequential)."""
    import httpx

    payload = orjson.dumps(body)
    url = f"http://{addr[0]}:{addr[1]}/generate"
    headers = {"content-type": "application/json"}
    out: dict[str, dict[str, float]] = {}

    async def measure(name: str, send: Any) -> None:
        for _ in range(20):
            await send()
        lat = []
        c0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            await send()
            lat.append(time.perf_counter() - t)
        out[name] = {"cpu_us": round((time.process_time() - c0) / n * 1e6, 1), "p50_ms": pct(lat)["p50"]}

    raw = HttpClient()

    async def raw_send() -> None:
        r = await raw.request(addr, b"POST", b"/generate", payload)
        await r.read()

    await measure("raw_asyncio", raw_send)
    await raw.aclose()
    async with httpx.AsyncClient() as hc:

        async def httpx_send() -> None:
            r = await hc.post(url, content=payload, headers=headers)
            _ = r.content

        await measure("httpx", httpx_send)
    try:
        import aiohttp
    except ImportError:
        return out
    async with aiohttp.ClientSession() as session:

        async def aiohttp_send() -> None:
            async with session.post(url, data=payload, headers=headers) as r:
                await r.read()

        await measure("aiohttp", aiohttp_send)
    return out


async def _interleaved_latency(targets: list[Target], args: argparse.Namespace) -> dict[str, Run]:
    clients = {t.name: HttpClient(read_s=30.0) for t in targets}
    runs = {t.name: Run() for t in targets}
    body = _body(args, stream=False)
    try:
        for _ in range(20):
            for t in targets:
                await one_request(clients[t.name], t, body, Run())
        deadline = time.monotonic() + args.time_limit
        for _ in range(args.latency_requests):
            if time.monotonic() > deadline:
                break
            for t in targets:
                await one_request(clients[t.name], t, body, runs[t.name])
    finally:
        for c in clients.values():
            await c.aclose()
    return runs


async def _throughput(
    target: Target, pid: int | None, args: argparse.Namespace, stream: bool
) -> dict[str, Any]:
    body = _body(args, stream)
    await closed_loop(target, body, 200, args.concurrency, args.time_limit)  # warm up
    c0 = cpu_seconds(pid) if pid else 0.0
    run = await closed_loop(target, body, args.requests, args.concurrency, args.time_limit)
    cpu = (cpu_seconds(pid) - c0) if pid else 0.0
    res: dict[str, Any] = {"rps": round(run.ok / run.elapsed, 1), "errors": run.errors,
                           "latency_ms": pct(run.latencies)}
    if pid:
        res["cpu_us_per_req"] = round(cpu / max(1, run.ok) * 1e6, 1)
    return res


def _print(title: str, obj: Any) -> None:
    print(f"{title}: {orjson.dumps(obj).decode()}", flush=True)


async def _serving_profile(addr: Addr, args: argparse.Namespace) -> dict[str, Any]:
    body = _body(args, stream=True)
    body["sampling_params"]["max_new_tokens"] = max(16, args.max_new_tokens)
    run = await closed_loop(Target("router", addr), body, min(args.requests, 400), args.concurrency,
                            args.time_limit)
    return {"requests": run.ok, "errors": run.errors, "ttft_ms": pct(run.ttft), "itl_ms": pct(run.itl),
            "e2e_ms": pct(run.latencies), "req_per_s": round(run.ok / run.elapsed, 1),
            "tokens_per_s": round(run.tokens / run.elapsed, 1)}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.router_url:
        host, _, port = args.router_url.removeprefix("http://").rstrip("/").partition(":")
        if host not in (LOCAL, "localhost"):
            raise SystemExit("pdserve bench serve only sends traffic to 127.0.0.1")
        prof = await _serving_profile((LOCAL, int(port)), args)
        _print("serving profile", prof)
        return {"serving": prof}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pdserve-bench-"))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    p_port, p_boot, d_port, r_port = free_port(), free_port(), free_port(), free_port()
    procs = []
    try:
        procs.append(spawn(fake_worker_cmd("prefill", p_port, p_boot, str(model_dir)), work / "prefill.log"))
        procs.append(spawn(fake_worker_cmd("decode", d_port, None, str(model_dir)), work / "decode.log"))
        for port in (p_port, d_port):
            await wait_ready((LOCAL, port), "/health", 30.0)
        router = spawn([sys.executable, "-m", "pdserve.cli", "router",
                        "--prefill", f"http://{LOCAL}:{p_port}", str(p_boot), "--decode", f"http://{LOCAL}:{d_port}",
                        "--port", str(r_port)], work / "router.log")
        procs.append(router)
        await wait_ready((LOCAL, r_port), "/health", 30.0, router)
        smg = None
        s_port = free_port()
        if not args.no_smg and importlib.util.find_spec("sglang_router") is not None:
            smg = spawn([sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                         "--prefill", f"http://{LOCAL}:{p_port}", str(p_boot), "--decode", f"http://{LOCAL}:{d_port}",
                         "--host", LOCAL, "--port", str(s_port), "--prometheus-host", LOCAL,
                         "--prometheus-port", str(free_port()), "--log-level", "warn"], work / "smg.log")
            procs.append(smg)
            await wait_ready((LOCAL, s_port), "/health", 60.0, smg)
        direct = Target("direct", (LOCAL, d_port), ((LOCAL, p_port), p_boot))
        ours = Target("pdserve", (LOCAL, r_port))
        theirs = Target("smg", (LOCAL, s_port)) if smg is not None else None
        targets = [t for t in (direct, ours, theirs) if t is not None]
        result: dict[str, Any] = {}

        n_client = min(args.latency_requests * 2, 1000)
        clients = await _client_cost((LOCAL, d_port), _body(args, False), n_client)
        _print("http client cost (sequential, this process)", clients)
        result["client_cpu_us"] = {k: v["cpu_us"] for k, v in clients.items()}

        lat = await _interleaved_latency(targets, args)
        lat_ms = {name: pct(run.latencies) for name, run in lat.items()}
        _print("sequential latency ms", lat_ms)
        result["latency_ms"] = lat_ms
        # Requests to the targets alternate, so request i of each saw the same machine state:
        # the added latency is taken over the paired differences (robust to slow drifts).
        direct_lat = lat["direct"].latencies
        for name, key in (("pdserve", "router_added_latency_ms"), ("smg", "sglang_router_added_latency_ms")):
            if name in lat:
                diffs = [a - b for a, b in zip(lat[name].latencies, direct_lat, strict=False)]
                result[key] = {q: v for q, v in pct(diffs).items() if q in ("p50", "p99")}
        _print("added latency vs direct, paired, ms", {k: result[k] for k in result if "added" in k})

        for stream in (False, True):
            kind = "stream" if stream else "json"
            tp = {"direct": await _throughput(direct, None, args, stream),
                  "pdserve": await _throughput(ours, router.pid, args, stream)}
            if theirs is not None and smg is not None:
                tp["smg"] = await _throughput(theirs, smg.pid, args, stream)
            _print(f"throughput ({kind}, concurrency {args.concurrency})", tp)
            result[f"throughput_{kind}"] = tp
        ours_cpu = result["throughput_json"]["pdserve"]["cpu_us_per_req"]
        result["router_cpu_us_per_req"] = ours_cpu
        result["router_cpu_vs_sglang_router"] = None  # without smg there is nothing to compare
        if theirs is not None:
            smg_cpu = result["throughput_json"]["smg"]["cpu_us_per_req"]
            result["sglang_router_cpu_us_per_req"] = smg_cpu
            result["router_cpu_vs_sglang_router"] = round(ours_cpu / max(smg_cpu, 1e-9), 3)
            s_ours = result["throughput_stream"]["pdserve"]["cpu_us_per_req"]
            s_smg = result["throughput_stream"]["smg"]["cpu_us_per_req"]
            result["router_cpu_vs_sglang_router_stream"] = round(s_ours / max(s_smg, 1e-9), 3)

        ttfc = {t.name: pct(await first_chunk_reused(t.addr, _body(args, True), 100))
                for t in targets if t.prefill is None}
        _print("time to first chunk on a reused connection, ms", ttfc)
        result["ttfc_reused_ms"] = {k: v["p50"] for k, v in ttfc.items()}

        for port in (p_port, d_port):
            c = HttpClient()
            await (await c.request((LOCAL, port), b"POST", b"/fake/config",
                                   orjson.dumps({"token_delay_s": args.token_delay}))).read()
            await c.aclose()
        prof = await _serving_profile((LOCAL, r_port), args)
        _print(f"serving profile via pdserve router (token delay {args.token_delay}s)", prof)
        result["serving"] = prof
        return result
    finally:
        for p in reversed(procs):
            stop(p)


def run_bench(args: argparse.Namespace) -> int:
    import uvloop

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    result = uvloop.run(_main(args))
    print(orjson.dumps(result).decode(), flush=True)
    return 0
