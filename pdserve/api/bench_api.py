"""CPU cost of the API layer per request and per streamed token (prints measurements).

    python -m pdserve.api.bench_api [--model-dir DIR] [--requests N] [--tokens T]

Measures, on this machine: request parsing + validation, chat templating + tokenisation (with a
no-op tokenizer that isolates this layer's own cost, the character tokenizer, and the engine's
real tokenizer when ``--model-dir`` is given), a whole
non-streamed chat request through ``OpenAIServing`` over an instant backend, and the per-token cost
of a streamed chat answer with reasoning and a tool call. The router's budget is ~300 µs/request.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from pdserve.api.backend import ChatTokenizer, RequestContext
from pdserve.api.chat import ChatRenderer
from pdserve.api.protocol import ChatCompletionRequest, parse_request
from pdserve.api.serving import OpenAIServing
from pdserve.api.testing import CharTokenizer
from pdserve.api.tool_parsers import TOOL_FORMATS
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "Does a thing " * 5,
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "opts": {"type": "object", "properties": {"x": {"type": "boolean"}}},
                },
                "required": ["city"],
            },
        },
    }
    for i in range(4)
]
MESSAGES = [
    {"role": "system", "content": "You are helpful. " * 20},
    {"role": "user", "content": "What is the weather in Paris tomorrow? " * 5},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "tool_0", "arguments": '{"city": "Paris", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "content": "sunny, 21C", "tool_call_id": "c1"},
    {"role": "user", "content": "And in Rome?"},
]
BODY = orjson.dumps(
    {
        "model": "glm",
        "stream": False,
        "temperature": 0.6,
        "max_tokens": 64,
        "tools": TOOLS,
        "messages": MESSAGES,
    }
)
ANSWER = [
    "<think>",
    "The",
    " user",
    " asks",
    " about",
    " Rome",
    ".",
    "</think>",
    "\n",
    "Checking",
    ".",
    "\n<tool_call>",
    "tool_0",
    "\n<arg_key>",
    "city",
    "</arg_key>",
    "\n<arg_value>",
    "Ro",
    "me",
    "</arg_value>",
    "\n<arg_key>",
    "days",
    "</arg_key>",
    "\n<arg_value>",
    "1",
    "</arg_value>",
    "\n</tool_call>",
]


class FixedTokenizer:
    """Costs ~nothing: isolates the API layer's own overhead from templating and tokenising."""

    def __init__(self, prompt: str, ids: list[int]) -> None:
        self._prompt, self._ids = prompt, ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._ids

    def decode(self, ids: Sequence[int]) -> str:
        return "x" * len(ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        return self._prompt


class InstantBackend:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, ctx: RequestContext
    ) -> AsyncIterator[RequestOutput]:
        n = len(self.pieces)
        for i, piece in enumerate(self.pieces):
            last = i == n - 1
            yield RequestOutput(
                request_id,
                [i],
                piece,
                finished=last,
                finish_reason="stop" if last else None,
                num_prompt_tokens=len(prompt_ids),
                num_output_tokens=i + 1,
            )


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


async def per_call_us_async(fn: Callable[[], Any], n: int) -> float:
    await fn()
    t0 = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - t0) / n * 1e6


async def bench_tokenizer(name: str, tok: ChatTokenizer, n: int, tokens: int) -> None:
    req = parse_request(BODY, ChatCompletionRequest)
    renderer = ChatRenderer(tok, tool_format=TOOL_FORMATS["glm45"])
    ids = renderer.render(req).ids
    us = per_call_us(lambda: renderer.render(req), n)
    print(f"render+tokenise [{name}] ({len(ids)} prompt tokens): {us:8.1f} us")

    serving = OpenAIServing(InstantBackend(["Sure."]), tok, served_model_name="glm", model_max_len=1 << 20)

    async def one() -> None:
        await serving.chat(parse_request(BODY, ChatCompletionRequest), RequestContext())

    print(f"non-streamed chat request, end to end [{name}]: {await per_call_us_async(one, n):8.1f} us")

    pieces = (ANSWER * (tokens // len(ANSWER) + 1))[:tokens]
    stream_serving = OpenAIServing(
        InstantBackend(pieces), tok, served_model_name="glm", model_max_len=1 << 20
    )
    stream_req = parse_request(BODY.replace(b'"stream":false', b'"stream":true'), ChatCompletionRequest)

    async def streamed() -> None:
        it = await stream_serving.chat(stream_req, RequestContext())
        if isinstance(it, dict):
            raise TypeError("expected a stream")
        async for _ in it:
            pass

    total = await per_call_us_async(streamed, max(1, n // 20))
    print(f"streamed chat, {tokens} deltas [{name}]: {total:8.1f} us/req, {total / tokens:6.2f} us/delta")


async def run(tokenizers: dict[str, ChatTokenizer], n: int, tokens: int) -> None:
    us = per_call_us(lambda: parse_request(BODY, ChatCompletionRequest), n)
    print(f"parse+validate chat request ({len(BODY)} B, 4 tools): {us:8.1f} us")
    for name, tok in tokenizers.items():
        await bench_tokenizer(name, tok, n, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=500)
    args = ap.parse_args()
    char = CharTokenizer()
    prompt = ChatRenderer(char, tool_format=TOOL_FORMATS["glm45"]).render(
        parse_request(BODY, ChatCompletionRequest)
    )
    tokenizers: dict[str, ChatTokenizer] = {"no-op": FixedTokenizer(prompt.text, prompt.ids), "char": char}
    if args.model_dir:
        from pdserve.engine.tokenizer import Tokenizer

        tokenizers["engine"] = Tokenizer.from_dir(args.model_dir)
    asyncio.run(run(tokenizers, args.requests, args.tokens))


if __name__ == "__main__":
    main()
