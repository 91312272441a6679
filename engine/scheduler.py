"""Continuous batching with chunked prefill, decode priority and preemption by recompute.

Each :meth:`Scheduler.schedule` call builds one step under a token budget
(``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``):

1. **Decodes first.** Every running sequence with one uncomputed token, oldest first, gets one
   token. If its next token needs a block and none is left, the youngest running sequence not yet
   scheduled this step is preempted (its blocks freed, its computed count reset to 0, and it is
   put back at the head of the waiting queue to be recomputed later); if the youngest is the
   sequence itself, it is the one preempted.
2. **Partial prefills next**, oldest first: each continues with as many of its remaining tokens
   as the budget allows (a long prompt is split across steps).
3. **Admission last**, FIFO, only if nothing was preempted this step: a waiting sequence gets a
   block table for all its tokens (prefix-cache hits skip computed blocks) and its first chunk.
   A waiting sequence that already holds blocks (adopted from a PD prefill) needs no allocation.

After the runner ran the step, :meth:`Scheduler.commit` advances each sequence's computed count
and registers newly computed full blocks in the prefix cache. :meth:`finish` and :meth:`abort`
remove a sequence and free its blocks (``finish(keep_blocks=True)`` hands them to the caller,
e.g. a PD prefill that holds the pages until they are transferred).
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.batch import SeqChunk
from pdserve.engine.block_manager import BlockManager, BlockManagerError
from pdserve.engine.sequence import SeqStatus, Sequence

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step: ``chunks[i]`` computes ``num_tokens[i]`` tokens of ``seqs[i]``."""

    seqs: list[Sequence] = field(default_factory=list)
    chunks: list[SeqChunk] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def sample_seqs(self) -> list[Sequence]:
        """Sequences whose chunk produces logits (one sampled token each), in chunk order."""
        return [s for s, c in zip(self.seqs, self.chunks, strict=True) if c.need_logits]


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise BlockManagerError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival (oldest first)
        self._by_id: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queries
    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def pending_prefill_tokens(self) -> int:
        """Tokens still to prefill: waiting sequences plus partial prefills of running ones."""
        queued = sum(s.num_uncomputed_tokens for s in self.waiting if not s.is_decoding)
        return queued + sum(s.num_uncomputed_tokens for s in self.running if not s.is_decoding)

    # ------------------------------------------------------------------ updates
    def add(self, seq: Sequence) -> None:
        """Queue a sequence (it may already hold blocks, e.g. adopted from a PD prefill)."""
        if seq.request_id in self._by_id:
            raise BlockManagerError(f"request {seq.request_id!r} is already scheduled")
        seq.status = SeqStatus.WAITING
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, *, keep_blocks: bool = False) -> None:
        """Remove a sequence that finished; free its blocks unless ``keep_blocks``."""
        self._remove(seq)
        if not keep_blocks:
            self.block_manager.free(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request in any state and free its blocks; None if unknown."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self._remove(seq)
        self.block_manager.free(seq)
        return seq

    def _remove(self, seq: Sequence) -> None:
        if self._by_id.pop(seq.request_id, None) is None:
            raise BlockManagerError(f"request {seq.request_id!r} is not scheduled")
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of sequences in the batch
        bm = self.block_manager

        # 1. decodes, oldest first
        bs = bm.block_size
        running = SeqStatus.RUNNING
        for seq in list(self.running):
            if budget == 0:
                break
            n_tok = len(seq.token_ids)
            if seq.status is not running or n_tok - seq.num_computed_tokens != 1:
                continue
            if n_tok > len(seq.block_table) * bs:  # the new token opens a block
                while not bm.can_append(seq):
                    victim = self._pick_victim(scheduled)
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
                bm.append_slot(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(1)
            batch.chunks.append(SeqChunk(seq.token_ids[-1:], n_tok - 1, seq.block_table, True))
            scheduled.add(id(seq))
            budget -= 1

        # 2. partial prefills, oldest first
        for seq in self.running:
            if budget == 0:
                break
            if id(seq) in scheduled or seq.is_decoding:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            self._emit(batch, seq, n)
            scheduled.add(id(seq))
            budget -= n

        # 3. admissions, FIFO (head-of-line blocking keeps the order fair)
        if not batch.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if not seq.block_table and not bm.try_allocate(seq):
                    break
                if seq.num_cached_tokens < 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
                self.waiting.popleft()
                seq.status = SeqStatus.RUNNING
                bisect.insort(self.running, seq, key=_arrival)
                if not bm.can_append(seq):  # adopted sequences may lack their next block
                    continue
                bm.append_slot(seq)
                n = min(seq.num_uncomputed_tokens, budget)
                self._emit(batch, seq, n)
                scheduled.add(id(seq))
                budget -= n
        return batch

    def commit(self, batch: ScheduledBatch) -> None:
        """Record that the runner computed the batch: advance counts, register full blocks."""
        bm = self.block_manager
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.register_computed(seq)

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _emit(batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        end = start + n
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        batch.chunks.append(
            SeqChunk(
                token_ids=seq.token_ids[start:end],
                start_pos=start,
                block_table=seq.block_table,
                need_logits=end == seq.num_tokens,
            )
        )

    def _pick_victim(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if id(seq) not in scheduled:
                return seq
        raise BlockManagerError("no sequence left to preempt")  # unreachable: the caller is unscheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (%d tokens) for recompute", seq.request_id, seq.num_tokens)


def _arrival(seq: Sequence) -> int:
    return seq.arrival
