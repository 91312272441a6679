"""pdserve.decode_worker: the worker server (all three roles) and the decode leg of PD.

- :mod:`.config` — ``WorkerConfig`` (role, addresses, engine + kvtransfer sections, limits);
- :mod:`.server` — ``build_app(config) -> FastAPI`` (SGLang PD protocol + OpenAI API) and the
  fleet's ``build_worker_app`` factory; :mod:`.state` builds everything in the lifespan;
- :mod:`.backend` — the ``GenerateBackend`` that picks the leg (prefill / decode / local);
- :mod:`.leg` — the decode leg (reserve, receive the KV, adopt, decode);
- :mod:`.watch` — per-request cancellation (client disconnect, ``/abort_request``);
- :mod:`.metrics` — ``pdserve:worker_*``; :mod:`.cli` — ``pdserve worker``;
- :mod:`.testing` — worker processes and a PD dispatcher for tests.

The prefill leg lives in :mod:`pdserve.prefill_worker`.
"""
