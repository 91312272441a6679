"""Fakes for the engine-core tests: a paged "model" that really goes through the KV cache, and a
tiny tokenizer whose tokens are readable text pieces.

:class:`FakeRunner` writes each computed token (and its position) into its KV slot, and computes
a row's logits from the context it *reads back* through the block table. So a wrong block table,
a bad prefix-cache hit, a lost page after preemption or a wrong PD page copy changes the logits,
and :func:`reference_greedy` (which never touches a cache) disagrees with the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pdserve.engine.batch import SeqChunk
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_config import ModelConfig

VOCAB = 64
EOS = 0
SPECIAL = 1  # "<|user|>"-like special token
_PIECES = [
    "<eos>",
    "<|user|>",
    *"abcdefghijklmnopqrstuvwxyz",
    "ab",
    "bc",
    "cd",
    " ",
    "\n",
    "STOP",
    "ST",
    "OP",
    "hello",
    " world",
    "</",
    "end>",
    "é",
    "!",
    "?",
    ".",
]
PIECES = _PIECES + [f"<{i}>" for i in range(len(_PIECES), VOCAB)]


def piece(token_id: int) -> str:
    return PIECES[token_id] if token_id < len(PIECES) else f"<{token_id}>"


def model_config(vocab: int = VOCAB, max_len: int = 4096) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "glm4_moe",
            "vocab_size": vocab,
            "max_position_embeddings": max_len,
            "hidden_size": 8,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_hidden_layers": 1,
            "eos_token_id": [EOS],
        }
    )


def ref_logits(ctx: Sequence[int], vocab: int = VOCAB) -> torch.Tensor:
    """Deterministic pseudo-random logits of a context (well spread: no greedy ties)."""
    seed = hash((len(ctx), tuple(ctx))) & 0x7FFF_FFFF
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def reference_greedy(prompt: Sequence[int], n: int, vocab: int = VOCAB) -> list[int]:
    ctx = list(prompt)
    out: list[int] = []
    for _ in range(n):
        tok = int(ref_logits(ctx, vocab).argmax())
        out.append(tok)
        ctx.append(tok)
    return out


class FakeRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 4,
        *,
        vocab: int = VOCAB,
        max_len: int = 4096,
        kv_storage: torch.Tensor | None = None,
    ) -> None:
        self._config = model_config(vocab, max_len)
        self._layout = KVLayout(
            num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32", block_size=block_size
        )
        self._num_blocks = num_blocks
        self._kv = kv_storage if kv_storage is not None else allocate_kv_storage(self._layout, num_blocks)
        self.steps: list[list[SeqChunk]] = []
        self.fail_next: Exception | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def kv_storage(self) -> torch.Tensor:
        return self._kv

    def run(self, chunks: list[SeqChunk], on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.steps.append(
            [SeqChunk(list(c.token_ids), c.start_pos, list(c.block_table), c.need_logits) for c in chunks]
        )
        bs = self._layout.block_size
        kv = self._kv[0]
        for c in chunks:
            for i, tok in enumerate(c.token_ids):
                p = c.start_pos + i
                blk, off = c.block_table[p // bs], p % bs
                kv[0, blk, off, 0, 0] = float(tok + 1)
                kv[1, blk, off, 0, 0] = float(p + 1)
        if on_layer_done is not None:
            on_layer_done(0)
        rows = []
        for c in chunks:
            if not c.need_logits:
                continue
            ctx = []
            for p in range(c.end_pos):
                blk, off = c.block_table[p // bs], p % bs
                if int(kv[1, blk, off, 0, 0]) != p + 1:
                    raise RuntimeError(
                        f"KV slot of position {p} holds position {int(kv[1, blk, off, 0, 0]) - 1}"
                    )
                ctx.append(int(kv[0, blk, off, 0, 0]) - 1)
            rows.append(ref_logits(ctx, self._config.vocab_size))
        if not rows:
            return torch.empty(0, self._config.vocab_size)
        return torch.stack(rows)


class FakeDetokenizer:
    def __init__(self, skip_special: bool) -> None:
        self._skip = skip_special

    def add(self, token_ids: Sequence[int] | int) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return "".join(piece(i) for i in ids if not (self._skip and i in (EOS, SPECIAL)))

    def finish(self) -> str:
        return ""


class FakeTokenizer:
    def __init__(self, eos: tuple[int, ...] = (EOS,)) -> None:
        self._eos = eos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def detokenizer(
        self, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> FakeDetokenizer:
        return FakeDetokenizer(skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        """Greedy longest-piece encoding (tests only)."""
        out: list[int] = []
        i = 0
        while i < len(text):
            best = max(
                (j for j, p in enumerate(PIECES) if p and text.startswith(p, i)), key=lambda j: len(PIECES[j])
            )
            out.append(best)
            i += len(PIECES[best])
        return out


def make_engine(
    num_blocks: int = 64,
    block_size: int = 4,
    *,
    max_len: int = 4096,
    kv_storage: torch.Tensor | None = None,
    eos: tuple[int, ...] = (EOS,),
    **config: Any,
) -> LLMEngine:
    config.setdefault("max_model_len", min(max_len, num_blocks * block_size))
    cfg = EngineConfig(
        model="fake", block_size=block_size, num_blocks=num_blocks, show_progress=False, **config
    )
    runner = FakeRunner(num_blocks, block_size, max_len=max_len, kv_storage=kv_storage)
    return LLMEngine(cfg, runner=runner, tokenizer=FakeTokenizer(eos))


def drain(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[Any]]:
    """Step until idle; per request id: [output ids, text, finish_reason, outputs]."""
    res: dict[str, list[Any]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return res
        for out in engine.step():
            r = res.setdefault(out.request_id, [[], "", None, []])
            r[0] += out.new_token_ids
            r[1] += out.new_text
            r[3].append(out)
            if out.finished:
                r[2] = out.finish_reason
    raise AssertionError("engine did not finish")
