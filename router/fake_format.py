"""What the fake worker answers: deterministic tokens and SGLang/OpenAI response shapes.

Tokens are a pure function of the prompt (CRC32 of its ids or text), so the prefill and decode
processes, and a colocated worker, agree on them without a model.
"""

from __future__ import annotations

import time
import uuid
import zlib
from typing import Any, Protocol

import orjson

from pdserve.errors import InvalidRequestError

_VOCAB = 5000
_BASE = 100


class _Settings(Protocol):
    num_tokens: int
    reply: str | None
    served_model_name: str


def _prompt(fmt: str, req: dict[str, Any]) -> tuple[bytes, int]:
    """(stable bytes naming the prompt, prompt token count)."""
    if fmt == "chat":
        parts = []
        for m in req.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts += [p.get("text", "") for p in c if isinstance(p, dict)]
        text = "\n".join(parts)
        return text.encode(), max(1, len(text.encode()) // 4)
    value = req.get("prompt") if fmt == "completion" else req.get("input_ids", req.get("text"))
    if isinstance(value, list) and value and isinstance(value[0], list | str):
        value = value[0]
    if isinstance(value, list):
        return orjson.dumps(value), max(1, len(value))
    text = value if isinstance(value, str) else ""
    return text.encode(), max(1, len(text.encode()) // 4)


class FakeOutput:
    """One request's whole (fake) generation."""

    __slots__ = (
        "batch", "finish", "fmt", "ids", "input_lp", "model", "pieces", "prompt_tokens", "req", "rid",
        "stream",
    )

    def __init__(self, fmt: str, req: dict[str, Any], ids: list[int], pieces: list[str], finish: str,
                 prompt_tokens: int, model: str) -> None:
        self.fmt = fmt
        self.req = req
        self.ids = ids
        self.pieces = pieces
        self.finish = finish
        self.prompt_tokens = prompt_tokens
        self.model = model
        self.stream = bool(req.get("stream"))
        self.input_lp = True  # a PD decode leg has no prompt logprobs (the prefill leg has them)
        self.rid = str(req.get("rid") or uuid.uuid4().hex)
        text, ids_ = req.get("text"), req.get("input_ids")
        self.batch = len(text) if isinstance(text, list) else (
            len(ids_) if isinstance(ids_, list) and ids_ and isinstance(ids_[0], list) else None
        )

    @classmethod
    def from_request(cls, fmt: str, req: dict[str, Any], s: _Settings) -> FakeOutput:
        key, prompt_tokens = _prompt(fmt, req)
        if fmt == "native":
            sp = req.get("sampling_params") or {}
            max_new = sp.get("max_new_tokens") if isinstance(sp, dict) else None
        else:
            max_new = req.get("max_completion_tokens") or req.get("max_tokens")
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {max_new!r}",
                                      param="max_new_tokens")
        n = max_new if isinstance(max_new, int) else s.num_tokens
        seed = zlib.crc32(key)
        if s.reply is not None:
            pieces = [s.reply[i : i + 3] for i in range(0, len(s.reply), 3)] or [""]
            finish = "stop" if len(pieces) <= n else "length"
            pieces = pieces[:n]
            ids = [_BASE + (seed + i) % _VOCAB for i in range(len(pieces))]
        else:
            ids = [_BASE + (seed + i * 7919) % _VOCAB for i in range(n)]
            pieces = [f" t{t}" for t in ids]
            finish = "length"
        model = str(req.get("model") or s.served_model_name)
        return cls(fmt, req, ids, pieces, finish, prompt_tokens, model)

    def truncate(self, n: int) -> None:
        if len(self.ids) > n:
            self.ids, self.pieces, self.finish = self.ids[:n], self.pieces[:n], "length"

    def finish_reason(self) -> dict[str, Any]:
        if self.finish == "length":
            return {"type": "length", "length": len(self.ids)}
        return {"type": "stop", "matched": None}

    def meta(self, upto: int, final: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid, "finish_reason": self.finish_reason() if final else None,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": upto, "cached_tokens": 0,
        }
        if self.req.get("return_logprob"):
            meta["output_token_logprobs"] = [[-0.5, t, None] for t in self.ids[:upto]]
        return meta

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.ids),
                "total_tokens": self.prompt_tokens + len(self.ids)}


def render_final(out: FakeOutput) -> bytes:
    text = "".join(out.pieces)
    created = int(time.time())
    if out.fmt == "completion":
        return orjson.dumps({"id": f"cmpl-{out.rid}", "object": "text_completion", "created": created,
                             "model": out.model, "usage": out.usage(), "choices": [
                                 {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish}]})
    if out.fmt == "chat":
        return orjson.dumps({"id": f"chatcmpl-{out.rid}", "object": "chat.completion", "created": created,
                             "model": out.model, "usage": out.usage(), "choices": [
                                 {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": out.finish}]})
    meta = out.meta(len(out.ids), True)
    if out.req.get("return_logprob") and out.input_lp:
        meta["input_token_logprobs"] = [[None, 0, None]] + [[-1.0, 0, None]] * (out.prompt_tokens - 1)
    one = {"text": text, "output_ids": out.ids, "meta_info": meta}
    return orjson.dumps([one] * out.batch if out.batch else one)


def render_stream_event(out: FakeOutput, i: int, incremental: bool) -> bytes:
    """The SSE event carrying token ``i`` (the last one carries the finish reason)."""
    final = i == len(out.ids) - 1
    piece = out.pieces[i]
    if out.fmt == "native":
        if incremental:
            obj: dict[str, Any] = {
                "text": piece, "output_ids": [out.ids[i]], "meta_info": out.meta(i + 1, final),
            }
            if "output_token_logprobs" in obj["meta_info"]:
                obj["meta_info"]["output_token_logprobs"] = obj["meta_info"]["output_token_logprobs"][i:]
        else:
            obj = {"text": "".join(out.pieces[: i + 1]), "output_ids": out.ids[: i + 1],
                   "meta_info": out.meta(i + 1, final)}
        obj["index"] = 0
    else:
        choice: dict[str, Any] = {
            "index": 0, "finish_reason": out.finish if final else None, "logprobs": None,
        }
        if out.fmt == "chat":
            choice["delta"] = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            obj = {"id": f"chatcmpl-{out.rid}", "object": "chat.completion.chunk", "model": out.model,
                   "created": int(time.time()), "choices": [choice]}
        else:
            choice["text"] = piece
            obj = {"id": f"cmpl-{out.rid}", "object": "text_completion", "model": out.model,
                   "created": int(time.time()), "choices": [choice]}
        if final:
            obj["usage"] = out.usage()
    return b"data: " + orjson.dumps(obj) + b"\n\n"
