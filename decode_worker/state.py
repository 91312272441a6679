"""``WorkerState``: everything a running worker owns, built and torn down by the app's lifespan.

Start-up (``await WorkerState.start(config)``), in order, undoing what was built if a step fails:

1. resolve the model directory (building the tiny default model on first use), create the
   app's :class:`CollectorRegistry` and the worker metrics;
2. decode role: size the KV pool from the model's layout and the engine config and let the
   transport allocate it (shm: a shared-memory segment the prefill writes into) — the engine
   gets it as ``kv_storage``; other roles: the engine allocates its own pool;
3. load the engine (weights, tokenizer) off the event loop; prefill role: install the
   :class:`LayerStreamer` as the engine's layer hook and bind the bootstrap endpoint on
   ``bootstrap_port`` (smg probes it); decode role: start the receive side;
4. start the engine thread (:class:`AsyncLLMEngine`), the backend and the OpenAI/native serving.

Shutdown (``await close()``): cancel in-flight requests, close the transfer services (open
rooms fail and the peers are told; shm segments unlinked), stop the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry

from pdserve import __version__
from pdserve.api.native_serving import NativeServing
from pdserve.api.serving import OpenAIServing
from pdserve.decode_worker.backend import WorkerBackend
from pdserve.decode_worker.config import WorkerConfig
from pdserve.decode_worker.leg import DecodeLeg
from pdserve.decode_worker.metrics import WorkerMetrics
from pdserve.decode_worker.watch import closing
from pdserve.engine.async_engine import AsyncLLMEngine
from pdserve.engine.kv_layout import KVLayout
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import ConfigError, PdserveError
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.prefill_worker.layer_stream import LayerStreamer
from pdserve.prefill_worker.leg import PrefillLeg

logger = logging.getLogger(__name__)


def plan_kv_pool(config: WorkerConfig) -> tuple[KVLayout, int]:
    """The KV layout and pool size the engine would pick for ``config`` (same rules)."""
    if config.model_path is None:
        raise ConfigError("plan_kv_pool needs a resolved config (call WorkerConfig.resolved())")
    mc = ModelConfig.from_dir(config.model_path)
    ec = config.engine
    layout = KVLayout(
        num_layers=mc.num_hidden_layers,
        num_kv_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        dtype=ec.dtype,
        block_size=ec.block_size,
    )
    max_len = ec.resolve_max_model_len(mc.max_position_embeddings)
    return layout, ec.resolve_num_blocks(layout.block_nbytes, max_len)


class WorkerState:
    def __init__(self, config: WorkerConfig, registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.started_at = time.time()
        self.prefill_service: PrefillTransferService | None = None
        self.decode_service: DecodeTransferService | None = None
        self.llm: LLMEngine | None = None
        self.engine: AsyncLLMEngine | None = None
        self.prefill_leg: PrefillLeg | None = None
        self.decode_leg: DecodeLeg | None = None
        self._backend: WorkerBackend | None = None
        self._openai: OpenAIServing | None = None
        self._native: NativeServing | None = None
        self._closed = False

    # ---------------------------------------------------------------------------- lifecycle
    @classmethod
    async def start(cls, config: WorkerConfig) -> WorkerState:
        config = await asyncio.to_thread(config.resolved)
        registry = CollectorRegistry()
        transport = config.kvtransfer.transport if config.role != "both" else "none"
        metrics = WorkerMetrics(
            registry, role=config.role, transport=transport, model=config.served_model_name or ""
        )
        state = cls(config, registry, metrics)
        try:
            await state._build()
        except BaseException:
            await state.close()
            raise
        metrics.watch_gauges(state.load_report)
        logger.info(
            "%s worker ready: model %s (%s), transport %s%s", config.role, config.served_model_name,
            config.model_path, transport,
            f", bootstrap port {state.bootstrap_port}" if state.prefill_service is not None else "",
        )  # fmt: skip
        return state

    async def _build(self) -> None:
        cfg, role = self.config, self.config.role
        if role == "decode":
            layout, num_blocks = await asyncio.to_thread(plan_kv_pool, cfg)
            self.decode_service = DecodeTransferService(
                cfg.kvtransfer, layout, num_blocks, registry=self.registry, host=cfg.host
            )
            self.llm = await asyncio.to_thread(
                LLMEngine, cfg.engine, kv_storage=self.decode_service.kv_storage
            )
            await self.decode_service.start()
        else:
            self.llm = await asyncio.to_thread(LLMEngine, cfg.engine)
        llm = self.llm
        streamer: LayerStreamer | None = None
        if role == "prefill":
            streamer = LayerStreamer(llm.block_size)
            llm.layer_callback = streamer
            self.prefill_service = PrefillTransferService(
                cfg.kvtransfer,
                llm.runner.layout,
                llm.runner.kv_storage,
                registry=self.registry,
                host=cfg.host,
                port=cfg.bootstrap_port,
            )
            await self.prefill_service.start()
        lim = cfg.limits
        self.engine = AsyncLLMEngine(llm, registry=self.registry, call_timeout_s=lim.engine_call_timeout_s)
        if self.prefill_service is not None and streamer is not None:
            self.prefill_leg = PrefillLeg(
                self.engine, self.prefill_service, streamer, self.metrics,
                transfer=cfg.kvtransfer, compute_timeout_s=lim.first_output_timeout_s,
            )  # fmt: skip
        if self.decode_service is not None:
            self.decode_leg = DecodeLeg(
                self.engine, self.decode_service, self.metrics, transfer=cfg.kvtransfer,
                default_bootstrap_port=cfg.bootstrap_port, reserve_wait_s=lim.reserve_wait_s,
            )  # fmt: skip
        self._backend = WorkerBackend(
            role, self.engine, self.metrics, vocab_size=llm.vocab_size,
            disconnect_poll_s=lim.disconnect_poll_s, prefill=self.prefill_leg, decode=self.decode_leg,
        )  # fmt: skip
        tokenizer = llm.tokenizer
        if not isinstance(tokenizer, Tokenizer):  # pragma: no cover - LLMEngine loads the real one
            raise ConfigError("the engine has no text tokenizer")
        common: dict[str, Any] = {
            "served_model_name": cfg.served_model_name or "",
            "model_max_len": llm.max_model_len,
            "first_output_timeout_s": lim.first_output_timeout_s,
            "output_timeout_s": lim.output_timeout_s,
            "request_timeout_s": lim.request_timeout_s,
            "close_timeout_s": lim.close_timeout_s,
        }
        self._openai = OpenAIServing(
            self._backend, tokenizer, reasoning_parser=cfg.reasoning_parser, tool_parser=cfg.tool_parser,
            owned_by="sglang", **common,
        )  # fmt: skip
        self._native = NativeServing(
            self._backend, tokenizer, default_max_tokens=lim.default_max_tokens,
            incremental_streaming_output=cfg.incremental_streaming_output, **common,
        )  # fmt: skip

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._backend is not None:
            self._backend.abort(None, "the worker is shutting down")
        for service in (self.prefill_service, self.decode_service):
            if service is not None:
                try:
                    await service.close()
                except Exception:
                    logger.exception("closing the KV transfer service failed")
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, self.config.limits.shutdown_timeout_s)
        logger.info("%s worker stopped", self.config.role)

    # ---------------------------------------------------------------------------- accessors
    @property
    def backend(self) -> WorkerBackend:
        if self._backend is None:
            raise PdserveError("the worker is not started")
        return self._backend

    @property
    def openai(self) -> OpenAIServing:
        if self._openai is None:
            raise PdserveError("the worker is not started")
        return self._openai

    @property
    def native(self) -> NativeServing:
        if self._native is None:
            raise PdserveError("the worker is not started")
        return self._native

    @property
    def bootstrap_port(self) -> int | None:
        return self.prefill_service.bootstrap_port if self.prefill_service is not None else None

    @property
    def healthy(self) -> bool:
        return not self._closed and self.engine is not None and self.engine.running

    # ---------------------------------------------------------------------------- reports
    def load_report(self) -> dict[str, Any]:
        """One data-parallel rank's load, in SGLang's ``/get_load`` vocabulary plus pdserve's."""
        if self.engine is None or self.llm is None:
            return {}
        ld = self.engine.load()
        pf, dc = self.prefill_leg, self.decode_leg
        awaiting_decode = pf.awaiting_decode if pf is not None else 0
        awaiting_kv = (dc.awaiting_kv + dc.reserve_waits) if dc is not None else 0
        waiting = ld.num_waiting + awaiting_decode + awaiting_kv
        used = ld.total_blocks - ld.free_blocks
        service = self.prefill_service or self.decode_service
        return {
            "dp_rank": 0,
            "role": self.config.role,
            "transport": self.config.kvtransfer.transport if service is not None else None,
            "num_reqs": ld.num_running + waiting,
            "num_running_reqs": ld.num_running,
            "num_waiting_reqs": waiting,
            "engine_waiting_reqs": ld.num_waiting,
            "awaiting_decode_reqs": awaiting_decode,
            "awaiting_kv_reqs": awaiting_kv,
            "transferring_reqs": pf.transferring if pf is not None else 0,
            "num_tokens": used * self.llm.block_size,
            "waiting_prefill_tokens": ld.waiting_prefill_tokens
            + (pf.awaiting_decode_tokens if pf is not None else 0),
            "free_kv_blocks": ld.free_blocks,
            "used_kv_blocks": used,
            "cached_kv_blocks": ld.cached_blocks,
            "held_kv_blocks": ld.held_blocks,
            "total_kv_blocks": ld.total_blocks,
            "kv_usage": round(used / ld.total_blocks, 6) if ld.total_blocks else 0.0,
            "kv_transfer_rooms": len(service.rooms) if service is not None else 0,
            "kv_pages_in_flight": service.pages_held() if service is not None else 0,
            "num_preemptions": ld.num_preemptions,
        }

    def model_info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model_path": cfg.model_path,
            "tokenizer_path": cfg.model_path,
            "served_model_name": cfg.served_model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }

    def server_info(self) -> dict[str, Any]:
        cfg, llm = self.config, self.llm
        service = self.prefill_service or self.decode_service
        info: dict[str, Any] = {
            "version": __version__,
            "engine": "pdserve",
            "model_path": cfg.model_path,
            "tokenizer_path": cfg.model_path,
            "served_model_name": cfg.served_model_name,
            "role": cfg.role,
            "disaggregation_mode": {"prefill": "prefill", "decode": "decode"}.get(cfg.role, "null"),
            "disaggregation_bootstrap_port": self.bootstrap_port,
            "disaggregation_transfer_backend": cfg.kvtransfer.transport if service is not None else None,
            "host": cfg.host,
            "port": cfg.port,
            "uptime_s": round(time.time() - self.started_at, 3),
            "engine_config": cfg.engine.model_dump(mode="json"),
            "kvtransfer_config": cfg.kvtransfer.model_dump(mode="json") if service is not None else None,
            "limits": cfg.limits.model_dump(mode="json"),
        }
        if llm is not None:
            info.update(
                page_size=llm.block_size,
                context_length=llm.max_model_len,
                max_total_num_tokens=llm.runner.num_blocks * llm.block_size,
                max_running_requests=cfg.engine.max_num_seqs,
                vocab_size=llm.vocab_size,
            )
        if service is not None:
            info["kv_transfer"] = service.describe()
        info["load"] = self.load_report()
        return info

    async def health_generate(self) -> bool:
        """Run a one-token generation through the engine (no PD legs), bounded in time."""
        if self.engine is None or not self.healthy:
            return False
        rid = f"health-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        try:
            async with asyncio.timeout(self.config.limits.health_generate_timeout_s):
                stream = self.engine.generate(rid, [1, 2, 3, 4], params)
                async with closing(stream):
                    async for out in stream:
                        if out.finished:
                            return out.finish_reason != "abort"
        except (TimeoutError, PdserveError) as exc:
            logger.warning("health_generate failed: %s", exc)
        return False
