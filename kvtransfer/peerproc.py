"""A standalone transfer peer process, driven by JSON lines, for fault tests and benchmarks.

``python -m pdserve.kvtransfer.peerproc --role prefill|decode --layout JSON --num-blocks N
[--config JSON] [--port P] [--advertise ADDR]``

Lifecycle:

1. builds the service (``--config`` is a :class:`TransferConfig` as JSON), starts it and writes
   ``{"event": "ready", "port", "incarnation", "pid", ...}``;
2. reads one JSON command per stdin line and answers with JSON event lines on stdout:

   * prefill: ``fill {seed}`` (random pages), ``send {room, blocks, aux, layer_delay_s}``
     (-> ``sent``), ``hold {room}`` (open a room, never finish it);
   * decode: ``receive {room, host, port, blocks}`` (-> ``received`` with a digest of the
     received pages), ``abort {room}``;
   * both: ``digest {blocks}``, ``stats``, ``close``;
   * ``raw_sink {nbytes, repeat, buffer}``: a plain TCP socket sink (the benchmark's raw
     loopback baseline);

3. EOF on stdin or ``close`` closes the service and exits 0. Being killed (SIGKILL) is the point
   of some tests: the survivor must notice.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.errors import TransferError
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.shm_pool import list_segments


def pages_digest(store: PageStore, blocks: list[int]) -> str:
    """sha256 over ``pages[l, k, b]`` for every layer, kind and block, in that order."""
    index = torch.tensor(blocks, dtype=torch.long, device=store.pages.device)
    h = hashlib.sha256()
    for layer in range(store.layout.num_layers):
        for kind in (0, 1):
            h.update(
                store.pages[layer, kind].index_select(0, index).cpu().view(torch.uint8).numpy().tobytes()
            )
    return h.hexdigest()


def fill_random(storage: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    flat = (
        storage.view(-1).view(torch.int16)
        if storage.element_size() == 2
        else storage.view(-1).view(torch.int32)
    )
    info = torch.iinfo(flat.dtype)
    flat.copy_(torch.randint(info.min, info.max, flat.shape, generator=gen, dtype=flat.dtype))


def error_event(exc: TransferError) -> dict[str, Any]:
    return {
        "ok": False,
        "error": type(exc).__name__,
        "side": exc.side,
        "phase": exc.phase,
        "reason": exc.reason,
        "message": exc.message,
    }


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = TransferConfig.model_validate_json(args.config)
        self.layout = KVLayout.from_dict(json.loads(args.layout))
        self.prefill: PrefillTransferService | None = None
        self.decode: DecodeTransferService | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.out_lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()

    @property
    def store(self) -> PageStore:
        if self.prefill is not None:
            return self.prefill.store
        if self.decode is not None:
            return self.decode.store
        raise TransferError("peer not started", phase="setup")

    async def start(self) -> None:
        registry = CollectorRegistry()
        if self.args.role == "prefill":
            device = self.config.device if self.config.transport == "nccl" else "cpu"
            storage = allocate_kv_storage(self.layout, self.args.num_blocks, device)
            self.prefill = PrefillTransferService(
                self.config, self.layout, storage, registry=registry, port=self.args.port
            )
            await self.prefill.start()
            self.emit(
                "ready",
                port=self.prefill.bootstrap_port,
                incarnation=self.prefill.incarnation,
                pid=os.getpid(),
            )
        else:
            self.decode = DecodeTransferService(
                self.config,
                self.layout,
                self.args.num_blocks,
                registry=registry,
                advertise_addr=self.args.advertise,
            )
            if self.args.prefault:  # touch every page now, as a long-running decode worker has
                self.decode.kv_storage.view(-1).view(torch.uint8).fill_(0)
            await self.decode.start()
            self.emit(
                "ready",
                incarnation=self.decode.incarnation,
                pid=os.getpid(),
                backend=self.decode.backend.describe(),
            )

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, cmd: dict[str, Any]) -> bool:
        name = cmd.get("cmd")
        if name == "fill":
            fill_random(self.store.storage, int(cmd["seed"]))
            self.emit("filled")
        elif name == "digest":
            self.emit("digest", digest=pages_digest(self.store, list(cmd["blocks"])))
        elif name == "stats":
            svc = self.prefill or self.decode
            self.emit(
                "stats",
                pages_held=svc.pages_held() if svc else 0,
                rooms=len(svc.rooms) if svc else 0,
                threads=threading.active_count(),
                segments=list_segments(self.config.shm_dir),
            )
        elif name == "send":
            self.spawn(self._send(cmd))
        elif name == "hold":
            if self.prefill is not None:
                self.prefill.create_sender(int(cmd["room"]))
            self.emit("holding", room=cmd["room"])
        elif name == "receive":
            self.spawn(self._receive(cmd))
        elif name == "abort":
            if self.decode is not None:
                self.decode.abort(int(cmd["room"]))
            if self.prefill is not None:
                self.prefill.abort(int(cmd["room"]))
        elif name == "raw_sink":
            nbytes = int(cmd["nbytes"])
            size = int(cmd.get("buffer", nbytes))
            self.spawn(asyncio.to_thread(self._raw_sink, nbytes, int(cmd.get("repeat", 1)), size))
        elif name == "close":
            return False
        return True

    async def _send(self, cmd: dict[str, Any]) -> None:
        svc = self.prefill
        if svc is None:
            return
        room = int(cmd["room"])
        try:
            sender = svc.create_sender(room)
            await sender.wait_ready()
            sender.set_source(list(cmd["blocks"]))
            delay = float(cmd.get("layer_delay_s", 0.0))
            if delay > 0:
                for layer in range(self.layout.num_layers):
                    await asyncio.sleep(delay)
                    sender.on_layer_done(layer)
            aux = AuxData.model_validate_json(json.dumps(cmd.get("aux", {"room": room, "first_token_id": 1})))
            result = await sender.finish(aux)
            self.emit("sent", room=room, ok=True, nbytes=result.nbytes, seconds=result.seconds)
        except TransferError as exc:
            self.emit("sent", room=room, **error_event(exc))

    async def _receive(self, cmd: dict[str, Any]) -> None:
        svc = self.decode
        if svc is None:
            return
        room, blocks = int(cmd["room"]), list(cmd["blocks"])
        t0 = time.perf_counter()
        try:
            aux = await svc.receive(str(cmd["host"]), int(cmd["port"]), room, blocks)
            seconds = time.perf_counter() - t0
            digest = pages_digest(svc.store, blocks) if cmd.get("digest", True) else None
            self.emit(
                "received",
                room=room,
                ok=True,
                aux=aux.model_dump(mode="json"),
                digest=digest,
                seconds=seconds,
            )
        except TransferError as exc:
            self.emit("received", room=room, **error_event(exc))

    def _raw_sink(self, nbytes: int, repeat: int, size: int) -> None:
        """Receive ``repeat`` streams of ``nbytes`` into a preallocated buffer of ``size`` bytes
        (reused cyclically when smaller), acknowledging each with one byte."""
        buf = np.empty(max(1, min(size, nbytes)), dtype=np.uint8)
        buf.fill(0)  # fault the pages in, as a preallocated KV pool would be
        view = buf.data
        with socket.create_server(("127.0.0.1", 0)) as server:
            self.emit("raw_port", port=server.getsockname()[1])
            conn, _ = server.accept()
            with conn:
                for _ in range(repeat):
                    got = 0
                    while got < nbytes:
                        at = got % len(buf)
                        n = conn.recv_into(view[at:], min(nbytes - got, len(buf) - at))
                        if n == 0:
                            self.emit("raw_done", ok=False, got=got)
                            return
                        got += n
                    conn.sendall(b"k")
        self.emit("raw_done", ok=True, got=nbytes)

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def reader() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, "")

        threading.Thread(target=reader, name="peer-stdin", daemon=True).start()
        while True:
            line = await lines.get()
            if not line or not await self.handle(json.loads(line)):
                break
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5.0)
        if self.prefill is not None:
            await self.prefill.close()
        if self.decode is not None:
            await self.decode.close()
        self.emit("closed", threads=threading.active_count(), segments=list_segments(self.config.shm_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.kvtransfer.peerproc")
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--layout", required=True, help="KVLayout as JSON")
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--config", default="{}", help="TransferConfig as JSON")
    parser.add_argument("--port", type=int, default=0, help="prefill bootstrap port (0: any)")
    parser.add_argument("--advertise", default=None, help="decode address to advertise")
    parser.add_argument("--prefault", action="store_true", help="decode: touch the whole KV pool at start")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    asyncio.run(Peer(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
