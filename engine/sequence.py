"""One request's token sequence as the scheduler and the block manager see it.

``token_ids`` is prompt + output so far. ``num_computed_tokens`` of them have their K/V in the
cache (a cached prefix, earlier prefill chunks, earlier decode steps); the remaining ones are
computed by the next steps. A sequence whose only uncomputed token is its last one decodes: one
token per step. After a preemption (recompute) ``num_computed_tokens`` drops to 0 and the whole
``token_ids`` list (prompt *and* output so far) is prefilled again, so the next sampled token is
exactly the one it would have been.

``block_hashes`` is the chained content hash of each full block of ``token_ids`` (block ``i``
hashes ``(block_hashes[i-1], tokens of block i)``). It depends on content only, so it survives
preemption; the block manager extends it lazily.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampling_params import SamplingParams

ROOT_HASH = 0  # the "parent" of a sequence's first block


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """Chained content hash of one full block (deterministic across processes for int tuples)."""
    return hash((parent, tokens))


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued (new or preempted); adopted PD sequences wait with blocks
    RUNNING = "running"  # in the running batch (prefilling or decoding)
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # effective limit on output tokens (params.max_tokens clipped to the context)
    arrival: int  # admission order; larger = younger (preempted first)
    hold_kv: bool = False
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last token is uncomputed: the next step is a one-token decode."""
        return len(self.token_ids) - self.num_computed_tokens == 1

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def full_block_hashes(self, block_size: int, num_blocks: int) -> list[int]:
        """The content hashes of the first ``num_blocks`` full blocks (computed on demand)."""
        hashes = self.block_hashes
        tokens = self.token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        return hashes


class OutputProcessor:
    """Turns one request's sampled tokens into :class:`RequestOutput` deltas.

    Per token: stop-token / EOS check (the token id is kept in the output ids but its text is not
    emitted), incremental detokenisation, stop-string search (a matched stop string and anything
    after it is trimmed), ``max_tokens``. Text that could be the beginning of a stop string is
    held back until it is known not to be one, so a stop string is never partially emitted even
    when it is split across tokens; a match therefore always starts inside the held-back buffer,
    which is all that is searched. Concatenating every ``new_text`` gives the final output text.
    """

    __slots__ = ("_buf", "_detok", "_eos", "_flush", "_stop_ids", "_stops", "seq")

    def __init__(
        self,
        seq: Sequence,
        detokenize: Callable[[int], str],
        flush: Callable[[], str],
        eos_token_ids: frozenset[int],
    ) -> None:
        self.seq = seq
        self._detok = detokenize
        self._flush = flush
        params = seq.params
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = tuple(params.stop)
        self._buf = ""  # detokenised text not emitted yet (held back for stop strings)

    def process(self, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Account for ``token_id`` (already appended to ``seq.token_ids``)."""
        seq = self.seq
        reason: str | None = None
        matched: int | str | None = None
        new_text = ""
        if token_id in self._stop_ids or token_id in self._eos:
            reason, matched = "stop", token_id
        else:
            buf = self._buf + self._detok(token_id)
            if self._stops:
                hit = self._find_stop(buf)
                if hit is not None:
                    reason, matched = "stop", hit[1]
                    new_text, buf = buf[: hit[0]], ""
                else:
                    cut = len(buf) - self._holdback(buf)
                    new_text, buf = buf[:cut], buf[cut:]
            else:
                new_text, buf = buf, ""
            self._buf = buf
        n_out = len(seq.token_ids) - seq.num_prompt_tokens
        if reason is None and n_out >= seq.max_tokens:
            reason = "length"
        if reason is not None and not isinstance(matched, str):
            new_text += self._buf + self._flush()
            self._buf = ""
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            matched_stop=matched,
            new_logprobs=[logprob] if logprob is not None and seq.params.logprobs is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=n_out,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
        )

    def abort_output(self) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason="abort",
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
        )

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stops:
            idx = text.find(s)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold


# ---------------------------------------------------------------------- per-request results
@dataclass(frozen=True)
class ChunkSpan:
    """Tokens ``[start_pos, end_pos)`` of ``request_id`` computed by the current step."""

    request_id: str
    start_pos: int
    end_pos: int
    block_ids: list[int]


@dataclass(frozen=True)
class PrefillResult:
    """What a PD prefill hands to the decode side once its prompt K/V are computed and held."""

    request_id: str
    first_token_id: int
    first_logprob: float
    first_top_logprobs: list[tuple[int, float]]
    num_prompt_tokens: int
    num_cached_tokens: int
    block_ids: list[int]
    finish_reason: str | None


@dataclass
class PrefillOutput(RequestOutput):
    """The finished delta of a ``hold_kv`` request; its blocks stay held until ``release``."""

    prefill: PrefillResult | None = None


@dataclass
class Completion:
    """A finished request's whole output (offline :meth:`LLMEngine.generate`)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0
