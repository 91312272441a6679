"""Helpers for the model/runner tests: tiny random GLM-4-MoE checkpoints built with HF itself, the HF
reference forward/generate, and a minimal greedy driver of :class:`ModelRunner` over SeqChunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.batch import SeqChunk
from pdserve.engine.model_runner import ModelRunner

TINY: dict[str, Any] = {
    "vocab_size": 640,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "attention_bias": True,
    "use_qk_norm": False,
    "routed_scaling_factor": 1.5,
    "norm_topk_prob": True,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "eos_token_id": None,
    "pad_token_id": None,
}


def make_checkpoint(path: Path, seed: int = 0, shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a tiny random ``Glm4MoeForCausalLM`` (fp32) to ``path``. Biases, norm weights and the
    router correction bias are randomised so they all matter; initializer std is raised so the
    logits are well spread (greedy ties are then vanishingly unlikely)."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    kwargs = {**TINY, **overrides}
    config = Glm4MoeConfig(initializer_range=0.08, **kwargs)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "norm" in name:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 0.2)
    save_kwargs: dict[str, Any] = {}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(path), **save_kwargs)
    return path


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import Glm4MoeForCausalLM

    return Glm4MoeForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits ``[len(ids), V]`` (float32) from the HF reference."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


def make_runner(
    path: Path, *, block_size: int = 4, num_blocks: int = 128, dtype: str = "float32"
) -> ModelRunner:
    return ModelRunner(
        None, path, dtype=dtype, block_size=block_size, num_blocks=num_blocks, show_progress=False
    )


@dataclass
class Seq:
    """One sequence driven by :class:`GreedyDriver`: its tokens so far and its pages."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    generated: list[int] = field(default_factory=list)


class GreedyDriver:
    """Bump allocator + greedy loop: enough scheduling to exercise the runner like an engine."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0

    def ensure_blocks(self, seq: Seq, num_tokens: int) -> None:
        bs = self.runner.block_size
        while len(seq.blocks) * bs < num_tokens:
            seq.blocks.append(self.next_block)
            self.next_block += 1

    def chunk(self, seq: Seq, n: int | None = None, need_logits: bool = True) -> SeqChunk:
        """The next ``n`` uncached tokens of ``seq`` (all of them when None)."""
        todo = seq.tokens[seq.cached :] if n is None else seq.tokens[seq.cached : seq.cached + n]
        self.ensure_blocks(seq, seq.cached + len(todo))
        chunk = SeqChunk(list(todo), seq.cached, list(seq.blocks), need_logits)
        seq.cached += len(todo)
        return chunk

    def step(self, work: list[tuple[Seq, SeqChunk]]) -> None:
        """Run one step; append the greedy token to every sequence whose chunk wanted logits."""
        logits = self.runner.run([c for _, c in work])
        wanted = [s for s, c in work if c.need_logits]
        assert logits.shape == (len(wanted), self.runner.model_config.vocab_size)
        for seq, row in zip(wanted, logits, strict=True):
            tok = int(row.argmax())
            seq.tokens.append(tok)
            seq.generated.append(tok)

    def decode(self, seqs: list[Seq], steps: int) -> None:
        for _ in range(steps):
            self.step([(s, self.chunk(s)) for s in seqs])


def prompt(seed: int, length: int, vocab: int = TINY["vocab_size"]) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, vocab, (length,), generator=gen)]
