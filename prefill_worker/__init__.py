"""pdserve.prefill_worker: the prefill leg of PD (:mod:`.leg`) and layer-wise KV streaming from
the engine's per-layer hook (:mod:`.layer_stream`). The server itself is
:mod:`pdserve.decode_worker.server` (one app for every role)."""
