"""``pdserve bench kv``: KV transfer GB/s per transport against the limits of the same machine.

For GLM-4.5-Air-shaped KV (46 layers, 8 KV heads, head dim 128, bf16: 184 KiB per token) at
each ``--tokens`` count, in one run:

1. ``memcpy``: one contiguous ``copy_`` of that many bytes into a preallocated buffer — the
   limit for ``shm``;
2. ``raw socket``: ``sendall`` of that many bytes over a loopback TCP socket into a
   preallocated buffer in another process (``recv_into``) — the limit for ``tcp``;
3. each transport: a prefill service here, a decode service in another process
   (:mod:`pdserve.kvtransfer.peerproc`), scattered source and destination pages (random block
   ids: the worst case for batching), time from ``finish()`` to the decode's confirmation;
4. layer streaming: a simulated forward (``--layer-ms`` per layer, on an engine thread calling
   ``on_layer_done``) and the transfer time still *exposed* after the last layer, against
   shipping everything after the forward.

Prints one line per measurement, the ratios, and last one JSON line with ``ratio_vs_limit``
(transport -> ratio to its limit at the largest token count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import socket
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import ChecksumError, TransferError, TransportError
from pdserve.kvtransfer.peerproc import fill_random, pages_digest
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.testing import PeerProcess

logger = logging.getLogger(__name__)

LIMIT_OF = {"shm": "memcpy", "tcp": "raw_socket", "nccl": "memcpy", "fake": "memcpy"}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma-separated token counts")
    parser.add_argument("--transports", default="shm,tcp", help="comma-separated: shm,tcp,nccl")
    parser.add_argument("--layers", type=int, default=46)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument(
        "--contiguous", action="store_true", help="consecutive block ids instead of scattered"
    )
    parser.add_argument("--layer-ms", type=float, default=20.0, help="simulated forward time per layer")
    parser.add_argument("--no-stream", action="store_true", help="skip the layer-streaming measurement")
    parser.add_argument(
        "--verify", action="store_true", help="digest-check every size (default: <= 4096 tokens)"
    )


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _memcpy(src: torch.Tensor, nbytes: int, repeat: int) -> float:
    flat = src.view(-1).view(torch.uint8)[:nbytes]
    dst = torch.empty_like(flat)
    dst.copy_(flat)  # fault the pages in: a KV pool is preallocated
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(flat)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_socket(peer: PeerProcess, src: torch.Tensor, nbytes: int, repeat: int) -> float:
    payload = src.view(-1).view(torch.uint8)[:nbytes].numpy().data
    peer.send("raw_sink", nbytes=nbytes, repeat=repeat + 1)
    port = peer.wait_event("raw_port", timeout=60)["port"]
    times = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        for i in range(repeat + 1):  # the first run warms both sides up
            t0 = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise TransportError("raw socket sink closed early", phase="transfer")
            if i:
                times.append(time.perf_counter() - t0)
    peer.wait_event("raw_done", timeout=60)
    return statistics.median(times)


async def _transfer(
    prefill: PrefillTransferService,
    peer: PeerProcess,
    room: int,
    src: list[int],
    dst: list[int],
    *,
    layer_s: float,
    stream: bool,
    digest: bool,
) -> tuple[float, float]:
    """One room; returns (seconds from the forward's end to confirmation, forward seconds)."""
    sender = prefill.create_sender(room)
    peer.send("receive", room=room, host="127.0.0.1", port=prefill.bootstrap_port, blocks=dst, digest=digest)
    await sender.wait_ready(60.0)
    sender.set_source(src)
    forward = 0.0
    if layer_s > 0:

        def engine() -> None:
            for layer in range(prefill.layout.num_layers):
                time.sleep(layer_s)
                if stream:
                    sender.on_layer_done(layer)

        t0 = time.perf_counter()
        await asyncio.to_thread(engine)
        forward = time.perf_counter() - t0
    t_end = time.perf_counter()
    await sender.finish(AuxData(room=room, first_token_id=1))
    exposed = time.perf_counter() - t_end
    got = await peer.wait_event_async("received", within=120.0, room=room)
    if not got["ok"]:
        raise TransferError(f"room {room} failed on the decode side: {got}", room=room)
    if digest and got["digest"] != pages_digest(prefill.store, src):
        raise ChecksumError(f"room {room}: bytes differ after the transfer", room=room)
    return exposed, forward


async def _bench_transport(
    args: argparse.Namespace,
    transport: str,
    layout: KVLayout,
    storage: torch.Tensor,
    tokens: list[int],
    num_blocks: int,
    rng: np.random.Generator,
    out: dict[str, Any],
) -> None:
    gpu = transport == "nccl"
    config = TransferConfig.model_validate(
        {
            "transport": transport,
            "device": "cuda:0" if gpu else "cpu",
            "transfer_timeout_s": 120.0,
            "waiting_timeout_s": 300.0,
        }
    )
    decode_config = config.model_copy(update={"device": "cuda:1" if gpu else "cpu"})
    prefill = PrefillTransferService(
        config, layout, storage.to("cuda:0") if gpu else storage, registry=CollectorRegistry()
    )
    await prefill.start()
    peer = await asyncio.to_thread(PeerProcess, "decode", layout, num_blocks, decode_config)
    room = 1
    try:
        for t in tokens:
            n = math.ceil(t / layout.block_size)
            nbytes = n * layout.block_nbytes
            times = []
            for i in range(args.repeat + 1):  # the first run warms up connections and page faults
                src = list(range(n)) if args.contiguous else [int(x) for x in rng.permutation(num_blocks)[:n]]
                dst = list(range(n)) if args.contiguous else [int(x) for x in rng.permutation(num_blocks)[:n]]
                verify = i == 1 and (args.verify or t <= 4096)
                seconds, _ = await _transfer(
                    prefill, peer, room, src, dst, layer_s=0.0, stream=False, digest=verify
                )
                room += 1
                if i:
                    times.append(seconds)
            gbps = _gbps(nbytes, statistics.median(times))
            out.setdefault("gbps", {}).setdefault(transport, {})[str(t)] = round(gbps, 3)
            print(
                f"{transport:>10}  {t:>6} tokens  {nbytes / 2**20:9.1f} MiB  {gbps:7.2f} GB/s  "
                f"(scattered pages: {not args.contiguous}, verified: {args.verify or t <= 4096})"
            )
        if not args.no_stream:
            t = tokens[-1]
            n = math.ceil(t / layout.block_size)
            src = [int(x) for x in rng.permutation(num_blocks)[:n]]
            dst = [int(x) for x in rng.permutation(num_blocks)[:n]]
            layer_s = args.layer_ms / 1000
            after, _ = await _transfer(
                prefill, peer, room, src, dst, layer_s=layer_s, stream=False, digest=False
            )
            streamed, fwd2 = await _transfer(
                prefill, peer, room + 1, src, dst, layer_s=layer_s, stream=True, digest=False
            )
            room += 2
            out.setdefault("streaming", {})[transport] = {
                "tokens": t,
                "forward_s": round(fwd2, 4),
                "exposed_after_forward_s": round(after, 4),
                "exposed_streaming_s": round(streamed, 4),
                "hidden_fraction": round(1 - streamed / after, 3) if after > 0 else None,
            }
            print(
                f"{transport:>10}  streaming {t} tokens, forward {fwd2 * 1e3:.0f} ms: exposed "
                f"{after * 1e3:.1f} ms when sent after the forward, {streamed * 1e3:.1f} ms layer by layer"
            )
    finally:
        await asyncio.to_thread(peer.close)
        await prefill.close()


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = sorted(int(t) for t in str(args.tokens).split(",") if t.strip())
    transports = [t.strip() for t in str(args.transports).split(",") if t.strip()]
    layout = KVLayout(
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        block_size=args.block_size,
    )
    num_blocks = math.ceil(max(tokens) / layout.block_size)
    print(
        f"KV layout {layout}: {layout.bytes_per_token / 1024:.0f} KiB/token; pool {num_blocks} blocks = "
        f"{num_blocks * layout.block_nbytes / 2**30:.2f} GiB per side; "
        f"torch threads {torch.get_num_threads()}"
    )
    storage = allocate_kv_storage(layout, num_blocks)
    fill_random(storage, 0)
    out: dict[str, Any] = {"bench": "kv", "layout": layout.to_dict(), "tokens": tokens}
    for t in tokens:
        nbytes = math.ceil(t / layout.block_size) * layout.block_nbytes
        sec = _memcpy(storage, nbytes, args.repeat)
        out.setdefault("memcpy_gbps", {})[str(t)] = round(_gbps(nbytes, sec), 3)
        print(f"{'memcpy':>10}  {t:>6} tokens  {nbytes / 2**20:9.1f} MiB  {_gbps(nbytes, sec):7.2f} GB/s")
    if "tcp" in transports:
        sink = await asyncio.to_thread(PeerProcess, "decode", layout, 1, TransferConfig(transport="fake"))
        try:
            for t in tokens:
                nbytes = math.ceil(t / layout.block_size) * layout.block_nbytes
                sec = await asyncio.to_thread(_raw_socket, sink, storage, nbytes, args.repeat)
                out.setdefault("raw_socket_gbps", {})[str(t)] = round(_gbps(nbytes, sec), 3)
                print(
                    f"{'raw socket':>10}  {t:>6} tokens  {nbytes / 2**20:9.1f} MiB  "
                    f"{_gbps(nbytes, sec):7.2f} GB/s"
                )
        finally:
            await asyncio.to_thread(sink.close)
    rng = np.random.default_rng(0)
    for transport in transports:
        await _bench_transport(args, transport, layout, storage, tokens, num_blocks, rng, out)
    ratios: dict[str, float] = {}
    by_tokens: dict[str, dict[str, float]] = {}
    for transport, per in out.get("gbps", {}).items():
        limit = out.get(f"{LIMIT_OF.get(transport, 'memcpy')}_gbps", {})
        by_tokens[transport] = {t: round(v / limit[t], 3) for t, v in per.items() if limit.get(t)}
        if by_tokens[transport]:
            ratios[transport] = by_tokens[transport][str(tokens[-1])]
            print(
                f"ratio {transport} / {LIMIT_OF[transport]}: "
                + ", ".join(f"{t} tokens {r:.2f}" for t, r in by_tokens[transport].items())
            )
    out["ratio_vs_limit"] = ratios
    out["ratio_vs_limit_by_tokens"] = by_tokens
    out["limits"] = {t: LIMIT_OF[t] for t in ratios}
    return out


def run_bench(args: argparse.Namespace) -> int:
    logging.getLogger("pdserve.kvtransfer").setLevel(logging.WARNING)
    threading.current_thread().name = "bench-main"
    result = asyncio.run(_run(args))
    print(json.dumps(result))
    return 0
