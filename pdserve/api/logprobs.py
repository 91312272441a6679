"""Engine logprobs (:class:`TokenLogprob`) in OpenAI chat and completions formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve.api.backend import ChatTokenizer
from pdserve.engine.outputs import TokenLogprob


class TokenTexts:
    """Per-token text for logprob entries, cached (bounded) per server instance."""

    def __init__(self, tokenizer: ChatTokenizer, max_entries: int = 65536) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._max = max_entries

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[token_id] = text
        return text


def _entry(texts: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    token = texts(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(texts: TokenTexts, items: Sequence[TokenLogprob], top_k: int) -> list[dict[str, Any]]:
    """Entries of ``choices[].logprobs.content``."""
    out: list[dict[str, Any]] = []
    for lp in items:
        entry = _entry(texts, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_entry(texts, t, v) for t, v in lp.top[:top_k]] if top_k else []
        out.append(entry)
    return out


class CompletionLogprobsBuilder:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, texts: TokenTexts, top_k: int, start_offset: int = 0) -> None:
        self._texts = texts
        self._top_k = top_k
        self._offset = start_offset

    def build(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in items:
            token = self._texts(lp.token_id)
            tokens.append(token)
            token_logprobs.append(lp.logprob)
            offsets.append(self._offset)
            self._offset += len(token)
            if self._top_k:
                top.append({self._texts(t): v for t, v in lp.top[: self._top_k]})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top if self._top_k else None,
            "text_offset": offsets,
        }

    def advance(self, text: str) -> None:
        """Move the text offset past text that has no logprobs (an echoed prompt)."""
        self._offset += len(text)
