"""The synchronous engine: requests in, one batched step at a time, :class:`RequestOutput` deltas out.

Request lifecycle:

1. ``add_request`` validates (unique id, non-empty prompt of in-vocabulary ids, the prompt leaves
   room for at least one output token) and queues a :class:`Sequence`. ``max_tokens`` beyond the
   context is *clipped* to ``max_model_len - len(prompt)`` (as SGLang does; the request ends with
   ``finish_reason="length"`` at the context limit) rather than rejected.
2. ``step`` schedules (continuous batching, chunked prefill, preemption by recompute), runs the
   model once, samples one token for every sequence whose chunk ended its uncomputed tokens, and
   returns one delta per sampled token (detokenised, stop-checked) plus any pending deltas
   (``abort``, ``adopt``).
3. A request ends on EOS (unless ``ignore_eos``), a stop token id, a stop string, ``max_tokens``
   or ``abort``; its blocks are freed — except with ``hold_kv=True`` (PD prefill role, forces
   ``max_tokens=1``), where they are *held* until ``release`` and the finished delta is a
   :class:`PrefillOutput` carrying a :class:`PrefillResult` (first token, its logprob, block ids).
4. PD decode role: ``reserve`` takes blocks for a prompt plus the first output token (raises
   :class:`OverloadedError` when they are not free now); the transfer service writes the
   prompt's K/V into them; ``adopt`` turns the reservation into a decoding sequence whose first
   output token is the one the prefill peer sampled (no forward pass; the prompt's full blocks
   enter the prefix cache); ``release`` drops a reservation that will not be adopted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.engine.batch import SeqChunk
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_layout import KVLayout
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import (
    ChunkSpan,
    Completion,
    OutputProcessor,
    PrefillOutput,
    PrefillResult,
    Sequence,
)
from pdserve.errors import ConfigError, ContextLengthError, InvalidRequestError, PdserveError

__all__ = [
    "ChunkSpan",
    "Completion",
    "EngineLoad",
    "EngineStepError",
    "LLMEngine",
    "PrefillOutput",
    "PrefillResult",
]

logger = logging.getLogger(__name__)

LayerCallback = Callable[[int, list[ChunkSpan]], None]


class Runner(Protocol):
    """What the engine needs from :class:`pdserve.engine.model_runner.ModelRunner`."""

    @property
    def model_config(self) -> ModelConfig: ...
    @property
    def layout(self) -> KVLayout: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def kv_storage(self) -> torch.Tensor: ...
    def run(
        self, chunks: list[SeqChunk], on_layer_done: Callable[[int], None] | None = None
    ) -> torch.Tensor: ...


class Detokenizer(Protocol):
    def add(self, token_ids: Seq[int] | int) -> str: ...
    def finish(self) -> str: ...


class EngineTokenizer(Protocol):
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...
    def detokenizer(
        self, prompt_ids: Seq[int] | None = None, skip_special_tokens: bool = True
    ) -> Detokenizer: ...


class EngineStepError(PdserveError):
    """The model runner or sampler failed during a step; ``details["request_ids"]`` were in it."""


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    waiting_prefill_tokens: int  # prompt tokens queued or mid-chunk, not yet computed
    free_blocks: int  # allocatable now (free + evictable cached)
    total_blocks: int
    cached_blocks: int  # unreferenced prefix-cache blocks (included in free_blocks)
    held_blocks: int  # held by finished hold_kv requests and decode reservations
    num_held: int
    num_reserved: int
    num_preemptions: int  # since start


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        kv_storage: torch.Tensor | None = None,
        runner: Runner | None = None,
        tokenizer: EngineTokenizer | None = None,
    ) -> None:
        self.config = config
        if config.model is None and (runner is None or tokenizer is None):
            from pdserve.engine.default_model import ensure_default_model

            self.model_dir = str(ensure_default_model())
        else:
            self.model_dir = config.model or ""
        if runner is None:
            runner = _build_runner(config, self.model_dir, kv_storage)
        elif kv_storage is not None:
            raise ConfigError("pass kv_storage to the runner, not to an engine given a runner")
        self.runner: Runner = runner
        mc = runner.model_config
        self.model_config = mc
        self.vocab_size = mc.vocab_size
        self.max_model_len = config.resolve_max_model_len(mc.max_position_embeddings)
        self.block_size = runner.layout.block_size
        if self.block_size != config.block_size:
            raise ConfigError(f"runner block_size {self.block_size} != config block_size {config.block_size}")
        config.check_pool(runner.num_blocks, self.max_model_len)
        if tokenizer is None:
            from pdserve.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(self.model_dir)
        self.tokenizer: EngineTokenizer = tokenizer
        self.eos_token_ids = frozenset(mc.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
        self.block_manager = BlockManager(
            runner.num_blocks, self.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.sampler = Sampler(seed=config.seed, device=config.device)
        self._procs: dict[str, OutputProcessor] = {}
        self._held: dict[str, PrefillResult] = {}
        self._reserved: dict[str, int] = {}
        self._pending: list[RequestOutput] = []
        self._arrivals = itertools.count()
        self.layer_callback: LayerCallback | None = None

    # ----------------------------------------------------------------- requests
    def add_request(
        self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, *, hold_kv: bool = False
    ) -> None:
        self._check_new_id(request_id)
        prompt = self._check_prompt(prompt_ids)
        max_tokens = self._clip_max_tokens(len(prompt), params)
        seq = self._new_sequence(request_id, prompt, params, 1 if hold_kv else max_tokens, hold_kv=hold_kv)
        self._procs[request_id] = self._processor(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state and free its blocks. A queued or running request gets a
        final ``finish_reason="abort"`` delta from the next :meth:`step`. False if unknown."""
        proc = self._procs.pop(request_id, None)
        if proc is not None:
            self.scheduler.abort(request_id)
            self._pending.append(proc.abort_output())
            return True
        return self.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return self._take_pending()
        try:
            logits = self.runner.run(batch.chunks, self._layer_hook(batch.seqs, batch.chunks))
            sample_seqs = batch.sample_seqs
            sampled = self.sampler.sample(
                logits,
                [s.params for s in sample_seqs],
                [s.generator for s in sample_seqs],
                force_logprob=[s.hold_kv for s in sample_seqs],
            )
        except Exception as exc:
            ids = [s.request_id for s in batch.seqs]
            raise EngineStepError(
                f"engine step failed: {type(exc).__name__}: {exc}", request_ids=ids
            ) from exc
        self.scheduler.commit(batch)
        outputs = self._take_pending()
        for seq, tok, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs, strict=True):
            seq.token_ids.append(tok)
            out = self._procs[seq.request_id].process(tok, lp)
            if out.finished:
                out = self._finish(seq, out, lp)
            outputs.append(out)
        return outputs

    def _finish(self, seq: Sequence, out: RequestOutput, lp: TokenLogprob | None) -> RequestOutput:
        rid = seq.request_id
        del self._procs[rid]
        self.scheduler.finish(seq, keep_blocks=seq.hold_kv)
        if not seq.hold_kv:
            return out
        result = PrefillResult(
            request_id=rid,
            first_token_id=seq.token_ids[seq.num_prompt_tokens],
            first_logprob=lp.logprob if lp is not None else float("nan"),
            first_top_logprobs=list(lp.top) if lp is not None else [],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            block_ids=list(seq.block_table),
            finish_reason=out.finish_reason,
        )
        self._held[rid] = result
        return PrefillOutput(**vars(out), prefill=result)

    # ----------------------------------------------------------------- PD hooks
    def held_blocks(self, request_id: str) -> list[int]:
        return list(self.prefill_result(request_id).block_ids)

    def prefill_result(self, request_id: str) -> PrefillResult:
        try:
            return self._held[request_id]
        except KeyError:
            raise InvalidRequestError(
                f"request {request_id!r} holds no prefilled KV", param="request_id"
            ) from None

    def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        """Blocks for a ``num_prompt_tokens`` prompt plus its first output token (to be filled by
        a KV transfer and then :meth:`adopt`-ed). Raises OverloadedError if not free now."""
        self._check_new_id(request_id)
        if (
            isinstance(num_prompt_tokens, bool)
            or not isinstance(num_prompt_tokens, int)
            or num_prompt_tokens < 1
        ):
            raise InvalidRequestError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens!r}")
        self._check_context(num_prompt_tokens)
        table = self.block_manager.reserve(request_id, self.block_manager.blocks_for(num_prompt_tokens + 1))
        self._reserved[request_id] = num_prompt_tokens
        return list(table)

    def adopt(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        first_token: int,
        params: SamplingParams,
        first_logprob: float | None = None,
        num_cached_tokens: int = 0,
        first_top_logprobs: list[tuple[int, float]] | None = None,
    ) -> None:
        """Turn a filled reservation into a decoding sequence; its first delta (``first_token``,
        stop checks applied) comes out of the next :meth:`step`. On a validation error the
        reservation is left as it was (the caller releases it)."""
        reserved = self._reserved.get(request_id)
        if reserved is None:
            raise InvalidRequestError(
                f"request {request_id!r} has no reservation to adopt", param="request_id"
            )
        prompt = self._check_prompt(prompt_ids)
        if len(prompt) != reserved:
            raise InvalidRequestError(
                f"adopt of {request_id!r}: prompt has {len(prompt)} tokens, {reserved} were reserved"
            )
        if (
            isinstance(first_token, bool)
            or not isinstance(first_token, int)
            or not 0 <= first_token < self.vocab_size
        ):
            raise InvalidRequestError(
                f"first_token {first_token!r} outside vocabulary [0, {self.vocab_size})"
            )
        seq = self._new_sequence(request_id, prompt, params, self._clip_max_tokens(len(prompt), params))
        del self._reserved[request_id]
        n = len(prompt)
        seq.token_ids.append(first_token)  # seq.token_ids is `prompt` itself: n is taken first
        seq.num_computed_tokens = n
        seq.num_cached_tokens = max(0, num_cached_tokens)
        seq.block_table = self.block_manager.table(request_id)
        self.block_manager.register_blocks(seq.token_ids[:n], seq.block_table)
        seq.num_registered_blocks = n // self.block_size
        self.sampler.skip(params, seq.generator, self.vocab_size)
        proc = self._processor(seq)
        lp = (
            None
            if first_logprob is None
            else TokenLogprob(first_token, first_logprob, list(first_top_logprobs or []))
        )
        out = proc.process(first_token, lp)
        self._pending.append(out)
        if out.finished:
            self.block_manager.free(seq)
        else:
            self._procs[request_id] = proc
            self.scheduler.add(seq)

    def release(self, request_id: str) -> bool:
        """Free a held prefill or an unadopted reservation. False (no-op) if neither."""
        if self._held.pop(request_id, None) is None and self._reserved.pop(request_id, None) is None:
            return False
        self.block_manager.free_owner(request_id)
        return True

    # ----------------------------------------------------------------- queries
    def load(self) -> EngineLoad:
        bm, sch = self.block_manager, self.scheduler
        held = sum(len(r.block_ids) for r in self._held.values())
        held += sum(bm.blocks_for(n + 1) for n in self._reserved.values())
        return EngineLoad(
            num_running=sch.num_running,
            num_waiting=sch.num_waiting,
            waiting_prefill_tokens=sch.pending_prefill_tokens(),
            free_blocks=bm.num_available,
            total_blocks=bm.num_blocks,
            cached_blocks=bm.num_cached,
            held_blocks=held,
            num_held=len(self._held),
            num_reserved=len(self._reserved),
            num_preemptions=sch.num_preemptions,
        )

    def request_ids(self) -> list[str]:
        """Every request the engine knows: queued, running, held or reserved."""
        return [*self._procs, *self._held, *self._reserved]

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[Completion]:
        """Run prompts to completion (offline use; the engine must have nothing else in flight)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        base = next(self._arrivals)
        done: dict[str, Completion] = {}
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            rid = f"gen-{base}-{i}"
            self.add_request(rid, prompt, p)
            done[rid] = Completion(request_id=rid, prompt_ids=list(prompt))
        try:
            while any(c.finish_reason is None for c in done.values()):
                for out in self.step():
                    c = done.get(out.request_id)
                    if c is None:
                        continue
                    c.output_ids += out.new_token_ids
                    c.text += out.new_text
                    c.logprobs += out.new_logprobs or []
                    c.num_cached_tokens = out.num_cached_tokens
                    if out.finished:
                        c.finish_reason, c.matched_stop = out.finish_reason, out.matched_stop
        except BaseException:
            for rid, c in done.items():
                if c.finish_reason is None:
                    self.abort(rid)
            self._take_pending()
            raise
        return list(done.values())

    # ----------------------------------------------------------------- internals
    def _take_pending(self) -> list[RequestOutput]:
        out, self._pending = self._pending, []
        return out

    def _layer_hook(self, seqs: list[Sequence], chunks: list[SeqChunk]) -> Callable[[int], None] | None:
        cb = self.layer_callback
        if cb is None:
            return None
        spans = [
            ChunkSpan(s.request_id, c.start_pos, c.end_pos, list(c.block_table))
            for s, c in zip(seqs, chunks, strict=True)
        ]
        return lambda layer: cb(layer, spans)

    def _check_new_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._procs or request_id in self._held or request_id in self._reserved:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")

    def _check_prompt(self, prompt_ids: Seq[int]) -> list[int]:
        prompt = list(prompt_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt token ids must be integers", param="prompt")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidRequestError(
                f"prompt token id {bad} outside vocabulary [0, {self.vocab_size})", param="prompt"
            )
        self._check_context(len(prompt))
        return prompt

    def _check_context(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} tokens and at least one output token must fit",
                param="prompt",
            )

    def _clip_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        return min(params.max_tokens, self.max_model_len - num_prompt_tokens)

    def _new_sequence(
        self, rid: str, prompt: list[int], params: SamplingParams, max_tokens: int, *, hold_kv: bool = False
    ) -> Sequence:
        gen = self.sampler.new_generator(params.seed) if params.seed is not None else None
        return Sequence(rid, prompt, len(prompt), params, max_tokens, next(self._arrivals), hold_kv, gen)

    def _processor(self, seq: Sequence) -> OutputProcessor:
        detok = self.tokenizer.detokenizer(
            seq.token_ids[: seq.num_prompt_tokens], skip_special_tokens=seq.params.skip_special_tokens
        )
        return OutputProcessor(seq, detok.add, detok.finish, self.eos_token_ids)


def _build_runner(config: EngineConfig, model_dir: str, kv_storage: torch.Tensor | None) -> Runner:
    from pdserve.engine.model_runner import ModelRunner

    mc = ModelConfig.from_dir(model_dir)
    if kv_storage is not None:  # the runner checks its exact shape, dtype and device
        num_blocks = int(kv_storage.shape[2]) if kv_storage.dim() == 6 else 1
    else:
        itemsize = 4 if config.dtype == "float32" else 2
        block_nbytes = (
            2 * mc.num_hidden_layers * config.block_size * mc.num_key_value_heads * mc.head_dim * itemsize
        )
        max_len = config.resolve_max_model_len(mc.max_position_embeddings)
        num_blocks = config.resolve_num_blocks(block_nbytes, max_len)
    return ModelRunner(
        mc,
        model_dir,
        dtype=config.dtype,
        device=config.device,
        block_size=config.block_size,
        num_blocks=num_blocks,
        kv_storage=kv_storage,
        show_progress=config.show_progress,
    )
