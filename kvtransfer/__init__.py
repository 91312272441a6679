"""pdserve.kvtransfer: moves each request's KV cache from prefill pages into decode pages.

Public API (imported lazily, so ``import pdserve.kvtransfer`` alone pulls in no torch):

* prefill worker: :class:`~pdserve.kvtransfer.prefill.PrefillTransferService` (bootstrap
  endpoint + sender) -> ``create_sender(room)`` -> :class:`~pdserve.kvtransfer.sender.KVSender`
  (``wait_ready``, ``set_source``, ``on_layer_done``, ``finish(aux)``, ``abort``);
* decode worker: :class:`~pdserve.kvtransfer.decode.DecodeTransferService` (owns the decode KV
  pool: ``kv_storage``) -> ``await receive(host, port, room, dst_block_ids) -> AuxData``, ``abort``;
* :class:`~pdserve.kvtransfer.config.TransferConfig`, :class:`~pdserve.kvtransfer.protocol.AuxData`,
  :class:`~pdserve.kvtransfer.states.KVPoll`, the error tree in :mod:`pdserve.kvtransfer.errors`,
  :class:`~pdserve.kvtransfer.shm_pool.SharedKVPool`.

Design notes and the wire protocol live in the module docstrings (``protocol``, ``bootstrap``,
``sender``, ``decode``, ``receiver``, ``transports``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrefillTransferService": "pdserve.kvtransfer.prefill",
    "DecodeTransferService": "pdserve.kvtransfer.decode",
    "KVSender": "pdserve.kvtransfer.sender",
    "TransferResult": "pdserve.kvtransfer.sender",
    "TransferConfig": "pdserve.kvtransfer.config",
    "AuxData": "pdserve.kvtransfer.protocol",
    "KVPoll": "pdserve.kvtransfer.states",
    "SharedKVPool": "pdserve.kvtransfer.shm_pool",
    "TransferError": "pdserve.kvtransfer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pdserve.kvtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
