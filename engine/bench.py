"""``pdserve bench engine``: decode throughput and TTFT of the engine vs HF transformers ``generate``.

Both run the same checkpoint (default: the embedded tiny model) in the same process, fp32, with
the same torch thread count, alternating pdserve and HF runs so machine noise hits both alike.

* **Decode tokens/s at batch B**: B distinct random prompts of ``--prompt-len`` tokens; the time
  to generate 1 token (prefill + first token) is subtracted from the time to generate
  ``--decode-tokens`` tokens, so ``B * (N - 1) / (t_N - t_1)`` counts decode steps only. pdserve
  runs its continuous-batching engine (:class:`LLMEngine`, greedy, ``ignore_eos``), HF runs
  ``model.generate(do_sample=False, min_new_tokens=N)`` with its KV cache.
* **TTFT at L prompt tokens**: one request, ``max_tokens=1``, wall time to the first token.

Fresh prompts for every run (no prefix-cache hits). Each number is the median of ``--repeats``.
Ratios > 1 mean pdserve is faster. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.add_argument("--model", default=None, metavar="DIR", help="checkpoint (default: embedded model)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens in the decode runs")
    parser.add_argument("--ttft-lens", default="512,2048", help="prompt lengths for TTFT (default 512,2048)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-hf", action="store_true", help="measure pdserve only")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (stable on a shared, busy machine)",
    )  # fmt: skip


def _ints(text: str, name: str) -> list[int]:
    from pdserve.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{name} must be positive integers, got {text!r}")
    return values


class _Prompts:
    """Fresh random prompts for every run (seeded, so a run is reproducible)."""

    def __init__(self, vocab: int) -> None:
        import torch

        self._gen = torch.Generator().manual_seed(1234)
        self._vocab = vocab

    def make(self, batch: int, length: int) -> list[list[int]]:
        import torch

        ids = torch.randint(0, self._vocab, (batch, length), generator=self._gen)
        return [[int(t) for t in row] for row in ids]


def _median_time(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.default_model import ensure_default_model
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.errors import ConfigError

    batches = _ints(args.batch_sizes, "--batch-sizes")
    ttft_lens = _ints(args.ttft_lens, "--ttft-lens")
    n_new, plen, repeats = args.decode_tokens, args.prompt_len, args.repeats
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if n_new < 2 or plen < 1 or repeats < 1:
        raise ConfigError("--decode-tokens must be >= 2, --prompt-len and --repeats >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    model_dir = args.model or str(ensure_default_model())
    max_batch = max(batches)
    max_len = max(max(ttft_lens) + 1, plen + n_new)
    config = EngineConfig.build(
        model=model_dir, dtype=args.dtype, max_num_seqs=max_batch,
        max_num_batched_tokens=max(max_len, max_batch * plen, 2048), max_model_len=max_len,
        num_blocks=max_batch * -(-(plen + n_new) // 16) + -(-max_len // 16) + 8,
        enable_prefix_caching=False, show_progress=False,
    )  # fmt: skip
    engine = LLMEngine(config)
    prompts = _Prompts(engine.vocab_size)
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=1)
    hf = None if args.skip_hf else _load_hf(model_dir, args.dtype)
    print(f"model {model_dir}  dtype {args.dtype}  threads {torch.get_num_threads()}  repeats {repeats}  "
          f"clock {args.clock}")

    runner_time = [0.0]  # clock time spent inside the model runner (to split off engine overhead)
    run = engine.runner.run

    def timed_run(chunks: list[Any], on_layer_done: Callable[[int], None] | None = None) -> Any:
        t0 = clock()
        try:
            return run(chunks, on_layer_done)
        finally:
            runner_time[0] += clock() - t0

    setattr(engine.runner, "run", timed_run)  # noqa: B010 (a protocol-typed attribute)

    def pd_run(batch: int, length: int, n: int) -> Callable[[], object]:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=n)
        return lambda: engine.generate(prompts.make(batch, length), params)

    def hf_run(batch: int, length: int, n: int) -> Callable[[], object]:
        return lambda: _hf_generate(hf, prompts.make(batch, length), n)

    engine.generate(prompts.make(2, 8), greedy)  # warm-up
    if hf is not None:
        _hf_generate(hf, prompts.make(2, 8), 2)
    result: dict[str, Any] = {
        "decode_tokens_per_s": {"pdserve": {}, "hf": {}},
        "ttft_s": {"pdserve": {}, "hf": {}},
        "engine_overhead_ms_per_step": {},
    }
    for b in batches:
        for name, make in (("pdserve", pd_run), ("hf", hf_run)):
            if name == "hf" and hf is None:
                continue
            t1 = _median_time(make(b, plen, 1), repeats, clock)
            runner_time[0] = 0.0
            tn = _median_time(make(b, plen, n_new), repeats, clock)
            if name == "pdserve":  # step time outside the runner: scheduler, sampler, outputs
                overhead = (tn - runner_time[0] / repeats) / n_new * 1e3
                result["engine_overhead_ms_per_step"][str(b)] = round(overhead, 3)
            tps = b * (n_new - 1) / max(tn - t1, 1e-9)
            result["decode_tokens_per_s"][name][str(b)] = round(tps, 1)
            step_ms = (tn - t1) / (n_new - 1) * 1e3
            extra = f", engine overhead {overhead:.2f} ms/step" if name == "pdserve" else ""
            print(f"decode  batch {b:>3}  {name:<8} {tps:10.1f} tok/s  ({step_ms:.2f} ms/step{extra})")
    for length in ttft_lens:
        for name, make in (("pdserve", pd_run), ("hf", hf_run)):
            if name == "hf" and hf is None:
                continue
            t = _median_time(make(1, length, 1), repeats, clock)
            result["ttft_s"][name][str(length)] = round(t, 5)
            print(f"ttft    {length:>5} tok  {name:<8} {t * 1e3:10.2f} ms")
    if hf is not None:
        dec, ttft = result["decode_tokens_per_s"], result["ttft_s"]
        result["decode_speedup_vs_hf"] = {k: round(v / dec["hf"][k], 2) for k, v in dec["pdserve"].items()}
        result["ttft_speedup_vs_hf"] = {k: round(ttft["hf"][k] / v, 2) for k, v in ttft["pdserve"].items()}
        for k, r in result["decode_speedup_vs_hf"].items():
            print(f"decode speedup vs HF at batch {k}: {r:.2f}x")
        for k, r in result["ttft_speedup_vs_hf"].items():
            print(f"TTFT speedup vs HF at {k} tokens: {r:.2f}x")
    result["config"] = {
        "model": model_dir, "dtype": args.dtype, "threads": torch.get_num_threads(), "prompt_len": plen,
        "decode_tokens": n_new, "repeats": repeats, "block_size": config.block_size, "clock": args.clock,
    }  # fmt: skip
    print(json.dumps(result))
    return 0


def _load_hf(model_dir: str, dtype: str) -> Any:
    import torch

    from pdserve.errors import ModelLoadError

    try:
        from transformers import Glm4MoeForCausalLM
    except ImportError as exc:
        raise ModelLoadError("transformers is needed for the HF baseline (or pass --skip-hf)") from exc
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    return Glm4MoeForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()


def _hf_generate(model: Any, prompts: list[list[int]], n: int) -> Any:
    import torch

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=0,
        )  # fmt: skip
