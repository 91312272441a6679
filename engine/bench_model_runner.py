"""Benchmark of the model runner on a tiny random GLM-4-MoE (the glm.md reference size), optionally
against the HF transformers reference on the same weights. Prints times and ratios; asserts nothing.

    python -m pdserve.engine.bench_model_runner [--threads N] [--prompt-len 512] [--no-hf] [--clock cpu]

``--clock cpu`` times with this process's CPU time, which is much steadier than wall time on a
shared, busy machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pdserve.engine.batch import SeqChunk
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.weights import expected_shapes

BENCH_CONFIG: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "attention_bias": True,
    "use_qk_norm": True,
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def write_random_checkpoint(path: Path, seed: int = 0) -> Path:
    cfg = ModelConfig.from_dict(BENCH_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(cfg).items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        tensors[name] = base + torch.randn(shape, generator=gen) * 0.08
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(BENCH_CONFIG))
    return path


def best_ms(
    fn: Callable[[], object], iters: int, repeats: int = 5, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best mean over ``repeats`` rounds (robust to a noisy shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(iters):
            fn()
        best = min(best, (clock() - start) / iters * 1e3)
    return best


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (runner default)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers reference")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall or process CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "bench")
        runner = ModelRunner(
            None, path, block_size=16, num_blocks=1024, show_progress=False, num_threads=args.threads
        )
        print(f"threads: {torch.get_num_threads()}")
        n = args.prompt_len
        ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (n,), generator=torch.Generator().manual_seed(1))
        prompt = [int(t) for t in ids]
        table = list(range(-(-(n + 1) // 16)))
        results: dict[str, float] = {}
        results["prefill"] = best_ms(lambda: runner.run([SeqChunk(prompt, 0, table)]), 5, clock=clock)
        results["decode_b1"] = best_ms(lambda: runner.run([SeqChunk([7], n, table)]), 30, clock=clock)
        for batch in (8, 32):
            chunks = [SeqChunk([7], n - 3 * i, [(b + 40 * i) % 1024 for b in table]) for i in range(batch)]
            results[f"decode_b{batch}"] = best_ms(lambda c=chunks: runner.run(c), 10, clock=clock)  # type: ignore[misc]
        mixed = [SeqChunk(prompt[:128], 0, table[:8])] + [SeqChunk([7], n, table) for _ in range(8)]
        results["mixed_128+8"] = best_ms(lambda: runner.run(mixed), 10, clock=clock)
        for name, ms in results.items():
            print(f"runner {name:>14}: {ms:8.2f} ms")
        if not args.no_hf:
            _compare_hf(path, prompt, results, clock)


def _compare_hf(path: Path, prompt: list[int], results: dict[str, float], clock: Callable[[], float]) -> None:
    try:
        from transformers import Glm4MoeForCausalLM
    except ImportError:
        print("transformers not installed: no HF comparison")
        return
    model = Glm4MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf_prefill = best_ms(lambda: model(ids, use_cache=False), 5, clock=clock)
        cache = model(ids, use_cache=True).cache

        def decode() -> None:
            model(torch.tensor([[7]]), cache=cache, use_cache=True)
            cache.crop(-1)

        hf_decode = best_ms(decode, 30, clock=clock)
    for name, ms in (("prefill", hf_prefill), ("decode_b1", hf_decode)):
        print(f"hf     {name:>14}: {ms:8.2f} ms   runner/hf = {results[name] / ms:.2f}")
    print(
        f"decode b32 per sequence: runner {results['decode_b32'] / 32:.3f} ms vs hf b1 {hf_decode:.2f} ms "
        f"(x{hf_decode / (results['decode_b32'] / 32):.1f} throughput)"
    )


if __name__ == "__main__":
    main()
