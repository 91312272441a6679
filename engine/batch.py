"""One step's work for the model runner.

A step is a list of :class:`SeqChunk` — one per scheduled sequence. Each chunk carries the tokens to
compute *this* step (a whole prompt, a slice of a prompt for chunked prefill, or one decode token),
``start_pos`` = how many of the sequence's tokens are already in the KV cache (cached prefix or
earlier chunks), and the block table covering positions ``[0, start_pos + len(token_ids))``.

Token ``p`` of the sequence lives in KV slot ``block_table[p // block_size] * block_size +
p % block_size``. ``need_logits=False`` marks a non-final prefill chunk whose logits nobody samples
(the runner skips the LM head for it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from pdserve.errors import ContextLengthError, InvalidRequestError, PdserveError


class InvalidBatchError(PdserveError):
    """A step's chunks are structurally inconsistent (an engine bug, not a client error)."""


@dataclass
class SeqChunk:
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    need_logits: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Context length after this chunk: positions ``[0, end_pos)`` are valid once it ran."""
        return self.start_pos + len(self.token_ids)


def validate_chunks(
    chunks: list[SeqChunk], *, block_size: int, num_blocks: int, max_positions: int, vocab_size: int
) -> None:
    """Raise a typed error for the first unusable chunk:

    * :class:`InvalidRequestError` — a token id outside ``[0, vocab_size)``;
    * :class:`ContextLengthError` — a position at or beyond ``max_positions``;
    * :class:`InvalidBatchError` — no tokens, negative ``start_pos``, a block table too short for
      ``end_pos`` or naming a block outside ``[0, num_blocks)``.
    """
    for i, chunk in enumerate(chunks):
        ids = chunk.token_ids
        if not ids:
            raise InvalidBatchError(f"chunk {i} has no tokens")
        if chunk.start_pos < 0:
            raise InvalidBatchError(f"chunk {i} has negative start_pos {chunk.start_pos}")
        end = chunk.start_pos + len(ids)
        if end > max_positions:
            raise ContextLengthError(
                f"chunk {i} reaches position {end - 1}, beyond the model's {max_positions} positions",
                param="input_ids",
            )
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidRequestError(
                f"token id {bad} outside vocabulary [0, {vocab_size})", param="input_ids"
            )
        need = -(-end // block_size)
        if len(chunk.block_table) < need:
            raise InvalidBatchError(
                f"chunk {i}: block table has {len(chunk.block_table)} blocks, {need} needed for {end} "
                f"positions at block_size {block_size}"
            )
        used = chunk.block_table[:need]
        if min(used) < 0 or max(used) >= num_blocks:
            raise InvalidBatchError(f"chunk {i}: block id outside [0, {num_blocks}) in {used}")


@dataclass
class PackedBatch:
    """A step's chunks flattened once, as CPU numpy arrays (int64), for the runner and the
    attention metadata. ``T`` = tokens in the step, ``S`` = chunks, ``W`` = widest block table."""

    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T] position of each token in its sequence
    slots: np.ndarray  # [T] KV slot of each token: block_table[pos // bs] * bs + pos % bs
    query_lens: np.ndarray  # [S] tokens of each chunk
    token_offsets: np.ndarray  # [S] row of each chunk's first token in the flat batch
    start_pos: np.ndarray  # [S]
    end_pos: np.ndarray  # [S]
    table_lens: np.ndarray  # [S] blocks covering [0, end_pos): ceil(end_pos / bs)
    block_tables: np.ndarray  # [S, W], row i valid up to table_lens[i], padded with block 0
    logit_rows: np.ndarray  # [<= S] last row of every need_logits chunk, in chunk order
    block_size: int
    pure_decode: bool  # every chunk has exactly one token (then T == S and row i is chunk i)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def all_rows_need_logits(self) -> bool:
        """Every row of the flat batch is a chunk's last token that wants logits (pure decode)."""
        return int(self.logit_rows.shape[0]) == self.num_tokens


@dataclass(frozen=True)
class BatchLimits:
    """What :func:`pack_chunks` checks every chunk against (see :func:`validate_chunks`)."""

    num_blocks: int
    max_positions: int
    vocab_size: int


def pack_chunks(chunks: list[SeqChunk], block_size: int, limits: BatchLimits | None = None) -> PackedBatch:
    """Flatten ``chunks`` (at least one) into a :class:`PackedBatch` with vectorised index math.

    With ``limits`` every chunk is checked with a few array reductions; a violation is reported
    by :func:`validate_chunks`, which names the first bad chunk. Without ``limits`` only the
    structure needed to pack is checked (tokens present, ``start_pos >= 0``, tables long enough).
    """
    num = len(chunks)
    if num == 0:
        raise InvalidBatchError("a step needs at least one chunk")
    if all(len(c.token_ids) == 1 for c in chunks):
        return _pack_decode(chunks, block_size, limits)
    lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, num)
    starts = np.fromiter((c.start_pos for c in chunks), np.int64, num)
    have = np.fromiter((len(c.block_table) for c in chunks), np.int64, num)
    ends = starts + lens
    need = -(-ends // block_size)
    if int(lens.min()) <= 0 or int(starts.min()) < 0 or bool((have < need).any()):
        _raise_first_error(chunks, block_size, limits)
    total = int(lens.sum())
    need_list: list[int] = need.tolist()
    tables = np.zeros((num, max(need_list)), np.int64)
    try:
        if total == num:  # pure decode: one token per chunk
            token_ids = np.fromiter((c.token_ids[0] for c in chunks), np.int64, num)
        else:
            ids = itertools.chain.from_iterable(c.token_ids for c in chunks)
            token_ids = np.fromiter(ids, np.int64, total)
        for i, chunk in enumerate(chunks):
            n = need_list[i]
            tables[i, :n] = chunk.block_table[:n]
    except (OverflowError, TypeError, ValueError):  # ids beyond int64, non-integers
        _raise_first_error(chunks, block_size, limits)
    if limits is not None and (
        int(token_ids.min()) < 0
        or int(token_ids.max()) >= limits.vocab_size
        or int(ends.max()) > limits.max_positions
        or int(tables.min()) < 0
        or int(tables.max()) >= limits.num_blocks
    ):
        _raise_first_error(chunks, block_size, limits)
    offsets = np.cumsum(lens) - lens
    if total == num:
        seq_of = np.arange(num)
        positions = starts
    else:
        seq_of = np.repeat(np.arange(num), lens)
        positions = np.arange(total) - offsets[seq_of] + starts[seq_of]
    slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
    wants = np.fromiter((c.need_logits for c in chunks), np.bool_, num)
    return PackedBatch(
        token_ids=token_ids,
        positions=positions,
        slots=slots,
        query_lens=lens,
        token_offsets=offsets,
        start_pos=starts,
        end_pos=ends,
        table_lens=need,
        block_tables=tables,
        logit_rows=(offsets + lens - 1)[wants],
        block_size=block_size,
        pure_decode=total == num,
    )


def _pack_decode(chunks: list[SeqChunk], block_size: int, limits: BatchLimits | None) -> PackedBatch:
    """:func:`pack_chunks` for one token per chunk (the decode hot path): plain Python over the
    chunks, a handful of array conversions, same checks."""
    num = len(chunks)
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    need: list[int] = []
    tables: list[list[int]] = []
    wants: list[bool] = []
    try:
        for chunk in chunks:
            pos = chunk.start_pos
            table = chunk.block_table
            n = pos // block_size + 1
            if pos < 0 or len(table) < n:
                _raise_first_error(chunks, block_size, limits)
            tokens.append(chunk.token_ids[0])
            positions.append(pos)
            slots.append(table[n - 1] * block_size + pos % block_size)
            need.append(n)
            tables.append(table[:n])
            wants.append(chunk.need_logits)
        width = max(need)
        padded = np.array([t if len(t) == width else [*t, *[0] * (width - len(t))] for t in tables], np.int64)
        token_arr = np.array(tokens, np.int64)
        slot_arr = np.array(slots, np.int64)
    except (OverflowError, TypeError, ValueError):  # ids beyond int64, non-integers
        _raise_first_error(chunks, block_size, limits)
    if limits is not None and (
        min(tokens) < 0
        or max(tokens) >= limits.vocab_size
        or max(positions) >= limits.max_positions
        or int(padded.min()) < 0
        or int(padded.max()) >= limits.num_blocks
    ):
        _raise_first_error(chunks, block_size, limits)
    rows = np.arange(num)
    pos_arr = np.array(positions, np.int64)
    return PackedBatch(
        token_ids=token_arr,
        positions=pos_arr,
        slots=slot_arr,
        query_lens=np.ones(num, np.int64),
        token_offsets=rows,
        start_pos=pos_arr,
        end_pos=pos_arr + 1,
        table_lens=np.array(need, np.int64),
        block_tables=padded,
        logit_rows=rows if all(wants) else rows[np.array(wants, np.bool_)],
        block_size=block_size,
        pure_decode=True,
    )


def _raise_first_error(chunks: list[SeqChunk], block_size: int, limits: BatchLimits | None) -> NoReturn:
    if limits is None:  # structure only: limits that cannot trip
        limits = BatchLimits(num_blocks=2**62, max_positions=2**62, vocab_size=2**62)
    validate_chunks(
        chunks,
        block_size=block_size,
        num_blocks=limits.num_blocks,
        max_positions=limits.max_positions,
        vocab_size=limits.vocab_size,
    )
    raise InvalidBatchError("inconsistent step chunks")  # unreachable: validate_chunks raised
