"""``pdserve bench kv``: KV transfer GB/s per transport against the limits of the same machine.

For GLM-4.5-Air-shaped KV (46 layers, 8 KV heads, head dim 128, bf16: 184 KiB per token) at
each ``--tokens`` count:

1. each transport runs with a prefill service in this process and a decode service in another
   (:mod:`pdserve.kvtransfer.peerproc`), with scattered source and destination pages (random
   block ids: the worst case for batching) and with consecutive ids (``--pages``), timed from
   ``finish()`` to the decode's confirmation (bytes verified by digest up to 4096 tokens);
2. each run is *paired* with a run of its limit, alternating, so machine noise hits both:
   ``shm`` with ``memcpy`` (one contiguous ``copy_`` of as many bytes into a preallocated buffer)
   and ``tcp`` with ``raw socket`` (``sendall`` over loopback TCP into a preallocated buffer
   in the decode process, ``recv_into``); the ratio is the median of the pairs' ratios;
3. layer streaming at the largest size: a simulated forward (``--layer-ms`` per layer, an
   engine thread calling ``on_layer_done``) and the transfer time still *exposed* after its
   last layer, against shipping everything after the forward.

Prints one line per point and, last, one JSON line with ``ratio_vs_limit`` (transport -> ratio
to its limit at the largest token count, scattered pages when measured: the conservative
headline), ``ratio_vs_limit_by_pages`` and the per-size details.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import socket
import statistics
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

LIMIT_OF = {"shm": "memcpy", "tcp": "raw_socket", "nccl": "memcpy", "fake": "memcpy"}
_SINK_BYTES = 256 << 20  # the raw sink's preallocated buffer (reused cyclically for larger runs)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma-separated token counts")
    parser.add_argument("--transports", default="shm,tcp", help="comma-separated: shm,tcp,nccl")
    parser.add_argument("--layers", type=int, default=46)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed pairs per point (median reported)")
    parser.add_argument(
        "--pages",
        default="both",
        choices=["scattered", "contiguous", "both"],
        help="block ids of each transfer: random (scattered), consecutive, or both (default)",
    )
    parser.add_argument("--layer-ms", type=float, default=20.0, help="simulated forward time per layer")
    parser.add_argument("--no-stream", action="store_true", help="skip the layer-streaming measurement")
    parser.add_argument("--verify", action="store_true", help="digest-check every size (default: <= 4096)")
    parser.add_argument("--frame-pages", type=int, default=None, help="override TransferConfig.frame_pages")


class _Memcpy:
    """One contiguous copy of ``nbytes`` into a preallocated (already faulted-in) buffer."""

    def __init__(self, src: torch.Tensor) -> None:
        self.src = src.view(-1).view(torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def run(self, nbytes: int) -> float:
        t0 = time.perf_counter()
        self.dst[:nbytes].copy_(self.src[:nbytes])
        return time.perf_counter() - t0


class _RawSocket:
    """``sendall`` over loopback TCP into the peer's preallocated buffer; one connection."""

    def __init__(self, peer: PeerProcess, src: torch.Tensor, nbytes: int, runs: int) -> None:
        self.payload = src.view(-1).view(torch.uint8)[:nbytes].numpy().data
        peer.send("raw_sink", nbytes=nbytes, repeat=runs, buffer=min(nbytes, _SINK_BYTES))
        self.peer = peer
        port = peer.wait_event("raw_port", timeout=60)["port"]
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.conn.sendall(self.payload)
        if self.conn.recv(1) != b"k":
            raise TransportError("raw socket sink closed early", phase="transfer")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()
        self.peer.wait_event("raw_done", timeout=60)


async def _transfer(
    prefill: PrefillTransferService,
    peer: PeerProcess,
    room: int,
    src: list[int],
    dst: list[int],
    *,
    layer_s: float = 0.0,
    stream: bool = False,
    digest: bool = False,
) -> tuple[float, float]:
    """One room; returns (seconds from the end of the forward to confirmation, forward seconds)."""
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


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokens = sorted(int(t) for t in str(args.tokens).split(",") if t.strip())
        self.layout = KVLayout(
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            block_size=args.block_size,
        )
        self.num_blocks = math.ceil(max(self.tokens) / self.layout.block_size)
        self.rng = np.random.default_rng(0)
        self.room = 0
        self.orders = ["scattered", "contiguous"] if args.pages == "both" else [args.pages]
        self.out: dict[str, Any] = {
            "bench": "kv",
            "layout": self.layout.to_dict(),
            "tokens": self.tokens,
            "pages": self.orders,
            "gbps": {},
            "ratio_vs_limit_by_tokens": {},
        }

    def ids(self, n: int, order: str = "scattered") -> list[int]:
        if order == "contiguous":
            return list(range(n))
        return [int(x) for x in self.rng.permutation(self.num_blocks)[:n]]

    def next_room(self) -> int:
        self.room += 1
        return self.room

    async def transport(self, transport: str, storage: torch.Tensor) -> None:
        args, layout = self.args, self.layout
        gpu = transport == "nccl"
        fields: dict[str, Any] = {
            "transport": transport,
            "device": "cuda:0" if gpu else "cpu",
            "transfer_timeout_s": 120.0,
            "waiting_timeout_s": 300.0,
        }
        if args.frame_pages:
            fields["frame_pages"] = args.frame_pages
        config = TransferConfig.model_validate(fields)
        prefill = PrefillTransferService(
            config, layout, storage.to("cuda:0") if gpu else storage, registry=CollectorRegistry()
        )
        await prefill.start()
        decode_config = config.model_copy(update={"device": "cuda:1" if gpu else "cpu"})
        peer = await asyncio.to_thread(
            lambda: PeerProcess("decode", layout, self.num_blocks, decode_config, prefault=True)
        )
        memcpy = _Memcpy(storage) if LIMIT_OF[transport] == "memcpy" else None
        try:
            for t in self.tokens:
                for order in self.orders:
                    await self.point(transport, prefill, peer, storage, memcpy, t, order)
            if not args.no_stream:
                await self.streaming(transport, prefill, peer)
        finally:
            await asyncio.to_thread(peer.close)
            await prefill.close()

    async def point(
        self,
        transport: str,
        prefill: PrefillTransferService,
        peer: PeerProcess,
        storage: torch.Tensor,
        memcpy: _Memcpy | None,
        t: int,
        order: str,
    ) -> None:
        """``repeat`` (transfer, limit) pairs at ``t`` tokens with ``order`` block ids."""
        n = math.ceil(t / self.layout.block_size)
        nbytes = n * self.layout.block_nbytes
        limit = LIMIT_OF[transport]
        raw = (
            None
            if memcpy
            else await asyncio.to_thread(_RawSocket, peer, storage, nbytes, self.args.repeat + 1)
        )
        pairs: list[tuple[float, float]] = []
        for i in range(self.args.repeat + 1):  # pair 0 warms up connections and caches
            base = memcpy.run(nbytes) if memcpy else await asyncio.to_thread(raw.run)  # type: ignore[union-attr]
            verify = i == 1 and (self.args.verify or t <= 4096)
            src, dst = self.ids(n, order), self.ids(n, order)
            sec, _ = await _transfer(prefill, peer, self.next_room(), src, dst, digest=verify)
            if i:
                pairs.append((sec, base))
        if raw is not None:
            await asyncio.to_thread(raw.close)
        gbps = nbytes / statistics.median(s for s, _ in pairs) / 1e9
        base_gbps = nbytes / statistics.median(b for _, b in pairs) / 1e9
        ratio = statistics.median(b / s for s, b in pairs)
        self.out["gbps"].setdefault(transport, {}).setdefault(order, {})[str(t)] = round(gbps, 3)
        self.out.setdefault(f"{limit}_gbps", {}).setdefault(order, {})[str(t)] = round(base_gbps, 3)
        by_tokens = self.out["ratio_vs_limit_by_tokens"].setdefault(transport, {}).setdefault(order, {})
        by_tokens[str(t)] = round(ratio, 3)
        print(
            f"{transport:>5} {t:>6} tokens {order:>10} {nbytes / 2**20:8.1f} MiB: {gbps:6.2f} GB/s | {limit} "
            f"{base_gbps:6.2f} GB/s | ratio {ratio:.2f} (median of {len(pairs)} pairs)"
        )

    async def streaming(self, transport: str, prefill: PrefillTransferService, peer: PeerProcess) -> None:
        t = self.tokens[-1]
        n = math.ceil(t / self.layout.block_size)
        src, dst = self.ids(n), self.ids(n)
        layer_s = self.args.layer_ms / 1000
        after, _ = await _transfer(prefill, peer, self.next_room(), src, dst, layer_s=layer_s)
        streamed, fwd = await _transfer(
            prefill, peer, self.next_room(), src, dst, layer_s=layer_s, stream=True
        )
        self.out.setdefault("streaming", {})[transport] = {
            "tokens": t,
            "forward_s": round(fwd, 4),
            "exposed_after_forward_s": round(after, 4),
            "exposed_streaming_s": round(streamed, 4),
            "hidden_fraction": round(1 - streamed / after, 3) if after > 0 else None,
        }
        print(
            f"{transport:>5} streaming {t} tokens, forward {fwd * 1e3:.0f} ms "
            f"({self.args.layer_ms:g} ms/layer): exposed {after * 1e3:.1f} ms if sent after the forward, "
            f"{streamed * 1e3:.1f} ms layer by layer"
        )

    async def run(self) -> dict[str, Any]:
        layout = self.layout
        print(
            f"KV layout {layout}: {layout.bytes_per_token / 1024:.0f} KiB/token; "
            f"pool {self.num_blocks} blocks = {self.num_blocks * layout.block_nbytes / 2**30:.2f} GiB/side; "
            f"torch threads {torch.get_num_threads()}; block ids: {', '.join(self.orders)}"
        )
        storage = allocate_kv_storage(layout, self.num_blocks)
        fill_random(storage, 0)
        for transport in [t.strip() for t in str(self.args.transports).split(",") if t.strip()]:
            await self.transport(transport, storage)
        # headline: the largest size, scattered pages when measured (the worst case)
        last = str(self.tokens[-1])
        by_tokens = self.out["ratio_vs_limit_by_tokens"]
        self.out["ratio_vs_limit_by_pages"] = {
            tr: {order: per[last] for order, per in orders.items()} for tr, orders in by_tokens.items()
        }
        self.out["ratio_vs_limit"] = {
            tr: per[self.orders[0]] for tr, per in self.out["ratio_vs_limit_by_pages"].items()
        }
        self.out["ratio_vs_limit_pages"] = self.orders[0]
        self.out["limits"] = {tr: LIMIT_OF[tr] for tr in by_tokens}
        return self.out


def run_bench(args: argparse.Namespace) -> int:
    logging.getLogger("pdserve.kvtransfer").setLevel(logging.WARNING)
    result = asyncio.run(_Bench(args).run())
    print(json.dumps(result))
    return 0
