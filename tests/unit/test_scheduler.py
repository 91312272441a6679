"""Scheduler: chunked prefill, decode priority, caps, preemption (youngest first), abort in every state."""

from __future__ import annotations

import itertools

import pytest

from pdserve.engine.block_manager import BlockManager, BlockManagerError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.sequence import SeqStatus, Sequence

pytestmark = pytest.mark.unit

BS = 4
_arrival = itertools.count()


def seq(rid: str, n: int, base: int = 0) -> Sequence:
    tokens = [(base + i) % 50 + 1 for i in range(n)]
    return Sequence(rid, tokens, n, SamplingParams(), 1000, next(_arrival))


def make(num_blocks: int = 64, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def run_step(sch: Scheduler, token: int = 7) -> ScheduledBatch:
    """Pretend the runner computed the batch and the sampler produced ``token`` for each row."""
    batch = sch.schedule()
    sch.commit(batch)
    for s in batch.sample_seqs:
        s.token_ids.append(token)
    sch.block_manager.check_invariants()
    return batch


def test_chunked_prefill_splits_long_prompt() -> None:
    sch = make(budget=4)
    s = seq("a", 10)
    sch.add(s)
    sizes, logits = [], []
    for _ in range(3):
        b = run_step(sch)
        sizes.append(b.num_tokens[0])
        logits.append(b.chunks[0].need_logits)
        assert b.chunks[0].start_pos == sum(sizes[:-1])
    assert sizes == [4, 4, 2] and logits == [False, False, True]
    assert s.num_tokens == 11 and s.is_decoding
    b = run_step(sch)
    assert b.num_tokens == [1] and b.chunks[0].token_ids == [7] and b.chunks[0].start_pos == 10


def test_decodes_first_prefill_fills_the_rest() -> None:
    sch = make(budget=6)
    d1, d2 = seq("d1", 3), seq("d2", 2)
    sch.add(d1)
    sch.add(d2)
    run_step(sch)  # both prefills fit (3 + 2)
    assert d1.is_decoding and d2.is_decoding
    p = seq("p", 20)
    sch.add(p)
    b = run_step(sch)
    assert [s.request_id for s in b.seqs] == ["d1", "d2", "p"]
    assert b.num_tokens == [1, 1, 4]
    b = run_step(sch)  # the partial prefill continues after the decodes
    assert b.num_tokens == [1, 1, 4] and b.chunks[2].start_pos == 4


def test_max_num_seqs_caps_running() -> None:
    sch = make(max_seqs=2)
    for i in range(4):
        sch.add(seq(f"s{i}", 3, i))
    b = run_step(sch)
    assert len(b.seqs) == 2 and sch.num_running == 2 and sch.num_waiting == 2
    assert sch.pending_prefill_tokens() == 6


def test_preemption_youngest_first_and_recompute() -> None:
    sch = make(num_blocks=4, budget=64)
    old, young = seq("old", 4), seq("young", 4, base=10)
    sch.add(old)
    sch.add(young)
    run_step(sch)  # 1 block each; each now has 5 tokens -> needs a 2nd block to decode
    run_step(sch)  # both get their 2nd block (4 used)
    for _ in range(3):
        run_step(sch)
    assert old.num_tokens == 9 and young.num_tokens == 9 and sch.block_manager.num_free == 0
    b = run_step(sch)  # both need a 3rd block, none free: the younger one is preempted
    assert b.preempted == [young] and [s.request_id for s in b.seqs] == ["old"]
    assert young.status is SeqStatus.WAITING and young.block_table == [] and young.num_computed_tokens == 0
    assert sch.waiting[0] is young and sch.num_preemptions == 1
    # once old finishes, young is recomputed over prompt + its outputs in one prefill. Its first
    # block survived in the prefix cache (its second was evicted for old's third block): reused.
    sch.finish(old)
    b = run_step(sch)
    assert b.seqs == [young] and b.num_tokens == [5] and b.chunks[0].token_ids == young.token_ids[4:9]
    assert b.chunks[0].need_logits and young.num_computed_tokens == 9
    assert sch.block_manager.num_used == 3


def test_preempts_itself_when_it_is_the_youngest() -> None:
    sch = make(num_blocks=2, budget=64)
    s = seq("s", 8)
    sch.add(s)
    run_step(sch)  # 2 blocks used; now 9 tokens -> needs a 3rd
    b = run_step(sch)
    assert b.preempted == [s] and b.empty
    assert sch.block_manager.num_used == 0 and sch.waiting[0] is s


def test_abort_in_every_state_returns_every_block() -> None:
    sch = make(num_blocks=32, max_seqs=2, budget=6)
    running = seq("running", 3)
    prefilling = seq("prefilling", 12)
    waiting = seq("waiting", 5)
    for s in (running, prefilling, waiting):
        sch.add(s)
    run_step(sch)  # running: whole prompt (3); prefilling: first chunk (3 of 12); waiting: capped out
    assert running.is_decoding and prefilling.num_computed_tokens == 3 and waiting.status is SeqStatus.WAITING
    run_step(sch)
    bm = sch.block_manager
    assert bm.num_used > 0
    assert sch.abort("prefilling") is prefilling
    assert sch.abort("waiting") is waiting
    assert sch.abort("running") is running
    assert sch.abort("nope") is None
    assert bm.num_used == 0 and not sch.has_unfinished()
    bm.check_invariants()


def test_finish_keep_blocks_and_errors() -> None:
    sch = make()
    s = seq("s", 5)
    sch.add(s)
    run_step(sch)
    sch.finish(s, keep_blocks=True)
    assert sch.block_manager.holds("s") and not sch.has_unfinished()
    assert sch.block_manager.free_owner("s")
    with pytest.raises(BlockManagerError):
        sch.finish(s)
    t = seq("t", 2)
    sch.add(t)
    with pytest.raises(BlockManagerError):
        sch.add(t)


def test_sequences_with_blocks_are_admitted_without_allocation() -> None:
    """A PD-adopted sequence waits with its blocks already filled and only needs decoding."""
    sch = make(num_blocks=8)
    bm = sch.block_manager
    s = seq("adopted", 6)
    s.block_table = bm.reserve("adopted", 2)
    s.token_ids.append(9)  # the first output token, sampled by the prefill peer
    s.num_computed_tokens = 6
    sch.add(s)
    b = run_step(sch)
    assert b.num_tokens == [1] and b.chunks[0].start_pos == 6 and b.chunks[0].token_ids == [9]
    assert len(s.block_table) == 2
