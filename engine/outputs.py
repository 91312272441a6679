"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """The delta produced for one request in one engine step.

    ``new_text`` is the incremental detokenisation of ``new_token_ids`` (with any matched stop
    string trimmed); concatenating every delta gives the full output text.
    ``finish_reason`` is ``"stop"`` (EOS, stop token or stop string), ``"length"`` (max_tokens or
    the context limit) or ``"abort"``, and is set only on the last delta.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
