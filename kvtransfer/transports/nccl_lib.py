"""Point-to-point primitives for the nccl transport: libnccl via ctypes, and a CPU loopback.

:class:`P2PLib` is what the nccl backends use; two implementations:

* :class:`NcclLibrary` loads ``libnccl.so.2`` lazily (``config.nccl_library``, else the
  ``nvidia-nccl-cu12`` wheel of the ``gpu`` extra, else the system loader) and raises
  :class:`TransportUnavailableError` with what to install when it cannot. Communicators are
  created *non-blocking* (``ncclConfig_t.blocking = 0``) so ``init_comm`` and ``wait`` poll
  ``ncclCommGetAsyncError`` against a timeout and ``ncclCommAbort`` on expiry: a peer that
  dies during set-up never hangs a thread.
* :class:`LoopbackP2P` moves host tensors between two endpoints in one process through
  in-memory queues. It keeps NCCL's pairing rule (each send matches the peer's next receive,
  in issue order), so the nccl transport's control logic — unique-id exchange, plans, ordering,
  draining dead rooms — is tested on CPU. It is never chosen implicitly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Protocol

import torch

from pdserve.kvtransfer.errors import TransferTimeoutError, TransportError, TransportUnavailableError

logger = logging.getLogger(__name__)

_NCCL_SUCCESS = 0
_NCCL_IN_PROGRESS = 7
_NCCL_UINT8 = 1
_UNDEF_INT = -(2**31)
_CONFIG_MAGIC = 0xCAFEBEEF
_CONFIG_VERSION = 21700  # the ncclConfig_v21700 layout below


class P2PLib(Protocol):
    name: str

    def unique_id(self) -> bytes: ...

    def init_comm(self, uid: bytes, nranks: int, rank: int, timeout: float) -> Any: ...

    def send(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any) -> None: ...

    def recv(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any, timeout: float) -> None: ...

    def group_start(self) -> None: ...

    def group_end(self) -> None: ...

    def wait(self, comm: Any, timeout: float) -> None: ...

    def abort(self, comm: Any) -> None: ...


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
    ]


def _candidates(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    found: list[str] = []
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for root in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(root, "lib", "libnccl.so.2")
        if os.path.exists(path):
            found.append(path)
    found.append("libnccl.so.2")
    return found


class NcclLibrary:
    """libnccl through ctypes (no torch.distributed needed)."""

    name = "nccl"

    def __init__(self, path: str | None = None) -> None:
        errors: list[str] = []
        self._lib: ctypes.CDLL | None = None
        for candidate in _candidates(path):
            try:
                self._lib = ctypes.CDLL(candidate)
                self.path = candidate
                break
            except OSError as exc:
                errors.append(f"{candidate}: {exc}")
        if self._lib is None:
            raise TransportUnavailableError(
                "transport 'nccl' needs libnccl.so.2: install the gpu extra (pip install 'pdserve[gpu]', "
                "i.e. nvidia-nccl-cu12) or set kvtransfer.nccl_library; tried " + "; ".join(errors),
                phase="setup",
            )
        lib = self._lib
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            _UniqueId,
            ctypes.c_int,
            ctypes.POINTER(_Config),
        ]
        lib.ncclCommGetAsyncError.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        for fn in (lib.ncclSend, lib.ncclRecv):
            fn.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
        version = ctypes.c_int()
        self._check(lib.ncclGetVersion(ctypes.byref(version)), "ncclGetVersion")
        self.version = version.value
        if self.version < 21700:
            raise TransportUnavailableError(
                f"NCCL {self.version} is too old (need >= 2.17 for non-blocking communicators)", phase="setup"
            )

    def _check(self, result: int, what: str) -> None:
        if result not in (_NCCL_SUCCESS, _NCCL_IN_PROGRESS):
            lib = self._lib
            text = lib.ncclGetErrorString(result).decode() if lib is not None else str(result)
            raise TransportError(f"{what} failed: {text} ({result})", phase="transfer")

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        if self._lib is not None:
            self._check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid.internal)

    def init_comm(self, uid: bytes, nranks: int, rank: int, timeout: float) -> Any:
        lib = self._lib
        if lib is None or len(uid) != 128:
            raise TransportError("bad NCCL unique id", phase="bootstrap")
        config = _Config(
            ctypes.sizeof(_Config),
            _CONFIG_MAGIC,
            _CONFIG_VERSION,
            0,
            _UNDEF_INT,
            _UNDEF_INT,
            _UNDEF_INT,
            None,
        )
        cid = _UniqueId()
        ctypes.memmove(cid.internal, uid, 128)
        comm = ctypes.c_void_p()
        self._check(
            lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, cid, rank, ctypes.byref(config)),
            "ncclCommInitRankConfig",
        )
        self.wait(comm, timeout)
        return comm

    def wait(self, comm: Any, timeout: float) -> None:
        """Poll until the communicator's queued work is issued; abort it on timeout/error."""
        lib = self._lib
        if lib is None:
            return
        state = ctypes.c_int(_NCCL_IN_PROGRESS)
        deadline = time.monotonic() + timeout
        while True:
            lib.ncclCommGetAsyncError(comm, ctypes.byref(state))
            if state.value == _NCCL_SUCCESS:
                return
            if state.value != _NCCL_IN_PROGRESS:
                self.abort(comm)
                self._check(state.value, "NCCL communicator")
            if time.monotonic() > deadline:
                self.abort(comm)
                raise TransferTimeoutError(f"NCCL operation not issued within {timeout} s", phase="transfer")
            time.sleep(0.001)

    def send(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any) -> None:
        lib = self._lib
        if lib is not None:
            self._check(
                lib.ncclSend(
                    tensor.data_ptr(),
                    tensor.numel() * tensor.element_size(),
                    _NCCL_UINT8,
                    peer,
                    comm,
                    _stream_ptr(stream),
                ),
                "ncclSend",
            )

    def recv(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any, timeout: float) -> None:
        lib = self._lib
        if lib is not None:
            self._check(
                lib.ncclRecv(
                    tensor.data_ptr(),
                    tensor.numel() * tensor.element_size(),
                    _NCCL_UINT8,
                    peer,
                    comm,
                    _stream_ptr(stream),
                ),
                "ncclRecv",
            )

    def group_start(self) -> None:
        if self._lib is not None:
            self._check(self._lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> None:
        if self._lib is not None:
            self._check(self._lib.ncclGroupEnd(), "ncclGroupEnd")

    def abort(self, comm: Any) -> None:
        if self._lib is not None and comm:
            self._lib.ncclCommAbort(comm)


def _stream_ptr(stream: Any) -> int | None:
    return None if stream is None else int(stream.cuda_stream)


class LoopbackP2P:
    """In-process pairs of host endpoints with NCCL's ordering rule (tests, CPU)."""

    name = "loopback"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipes: dict[tuple[str, int], queue.SimpleQueue[torch.Tensor]] = {}
        self._joined: dict[str, set[int]] = {}

    def unique_id(self) -> bytes:
        return uuid.uuid4().bytes * 8

    def _pipe(self, uid: str, rank: int) -> queue.SimpleQueue[torch.Tensor]:
        with self._lock:
            return self._pipes.setdefault((uid, rank), queue.SimpleQueue())

    def init_comm(self, uid: bytes, nranks: int, rank: int, timeout: float) -> Any:
        key = uid.hex()
        deadline = time.monotonic() + timeout
        with self._lock:
            self._joined.setdefault(key, set()).add(rank)
        while True:  # like NCCL: init returns once every rank joined
            with self._lock:
                if len(self._joined[key]) == nranks:
                    return (key, rank)
            if time.monotonic() > deadline:
                raise TransferTimeoutError(
                    f"loopback communicator: peers missing after {timeout} s", phase="bootstrap"
                )
            time.sleep(0.001)

    def send(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any) -> None:
        self._pipe(comm[0], peer).put(tensor.detach().clone())

    def recv(self, comm: Any, tensor: torch.Tensor, peer: int, stream: Any, timeout: float) -> None:
        try:
            data = self._pipe(comm[0], comm[1]).get(timeout=timeout)
        except queue.Empty:
            raise TransferTimeoutError(
                f"loopback receive: nothing sent within {timeout} s", phase="transfer"
            ) from None
        if data.numel() * data.element_size() != tensor.numel() * tensor.element_size():
            raise TransportError(
                "loopback receive: size mismatch between paired send and receive", phase="transfer"
            )
        tensor.view(torch.uint8).view(-1).copy_(data.view(torch.uint8).view(-1))

    def group_start(self) -> None:
        return None

    def group_end(self) -> None:
        return None

    def wait(self, comm: Any, timeout: float) -> None:
        return None

    def abort(self, comm: Any) -> None:
        return None
