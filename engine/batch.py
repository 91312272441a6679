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

from dataclasses import dataclass

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
