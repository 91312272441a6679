"""SGLang native ``/generate`` wire format <-> engine objects.

Wire format (SGLang ``tokenizer_manager``): each response or stream chunk is
``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
"cached_tokens", "output_token_logprobs"?, "output_top_logprobs"?, ...}}``; ``finish_reason`` is
null until the last chunk, then ``{"type": "stop", "matched": token_id|str}``,
``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}``. Logprob entries are
``[logprob, token_id, text_or_null]``. SSE framing is ``data: {json}\\n\\n`` then
``data: [DONE]\\n\\n``; an error mid-stream is ``data: {"error": {...}}``.

Streaming semantics: SGLang's default streams *cumulative* ``text``, ``output_ids`` and output
logprob lists (each chunk repeats everything so far); with ``--incremental-streaming-output`` each
chunk carries only the delta. Our workers do either (:class:`NativeOutputWriter`); the router's
:class:`NativeOutputParser` detects which one a worker uses from ``completion_tokens`` versus
``len(output_ids)`` and turns both into :class:`RequestOutput` deltas.

Helpers: (a) :func:`request_to_engine` (worker: request -> prompt ids + SamplingParams),
(b) :class:`NativeOutputWriter` (worker: deltas -> chunks/response), (c) :class:`NativeOutputParser`
(router: chunks/SSE bytes -> deltas), (d) :func:`build_generate_request` (router: the body to send).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson

from pdserve.api.backend import BootstrapInfo, ChatTokenizer
from pdserve.api.protocol import GenerateRequest
from pdserve.api.sse import DONE_PAYLOAD, SSEDecoder
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ContextLengthError, InvalidRequestError, WorkerError

StreamMode = Literal["auto", "cumulative", "incremental"]

# --------------------------------------------------------------------------- (a) request -> engine


def request_to_engine(
    req: GenerateRequest,
    tokenizer: ChatTokenizer | None,
    *,
    model_max_len: int,
    default_max_tokens: int = 128,
) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling params of a native request; 400 on anything unusable."""
    ids = req.token_ids()
    if ids is None:
        if tokenizer is None:
            raise InvalidRequestError("this server takes input_ids only (no tokenizer)", param="text")
        ids = tokenizer.encode(req.text if isinstance(req.text, str) else "", add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("text must not be empty", param="text")
    sp = req.sampling_params
    room = model_max_len - len(ids)
    if room < 1:
        raise _context_error(model_max_len, len(ids), None)
    requested = sp.max_new_tokens if sp is not None else None
    if requested is not None and requested > room:
        raise _context_error(model_max_len, len(ids), requested)
    max_tokens = requested if requested is not None else min(default_max_tokens, room)
    logprobs = req.top_logprobs_num if req.return_logprob else None
    if sp is None:
        return ids, SamplingParams(max_tokens=max_tokens, logprobs=logprobs)
    seed = sp.sampling_seed if sp.sampling_seed is not None else sp.seed
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        seed=seed,
        stop=sp.stop_list(),
        stop_token_ids=list(sp.stop_token_ids or ()),
        ignore_eos=sp.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=sp.skip_special_tokens,
    )
    return ids, params


def _context_error(limit: int, prompt_len: int, requested: int | None) -> InvalidRequestError:
    if requested is None:
        msg = f"the prompt has {prompt_len} tokens; the model's context length is {limit}"
        return ContextLengthError(msg, param="input_ids")
    msg = (
        f"requested {prompt_len + requested} tokens ({prompt_len} prompt + {requested} new) but the model's "
        f"context length is {limit}"
    )
    return ContextLengthError(msg, param="sampling_params.max_new_tokens")


# ----------------------------------------------------------------------- (d) engine -> request


def build_generate_request(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    rid: str,
    stream: bool,
    bootstrap: BootstrapInfo | None = None,
    incremental: bool | None = None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``/generate`` body a router sends a worker (both PD legs get the same body)."""
    sampling: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
    }
    if params.stop:
        sampling["stop"] = list(params.stop)
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    body: dict[str, Any] = dict(extras or {})
    body.update(input_ids=list(prompt_ids), sampling_params=sampling, stream=stream, rid=rid)
    if params.logprobs is not None:
        body["return_logprob"] = True
        body["top_logprobs_num"] = params.logprobs
    if bootstrap is not None:
        body.update(bootstrap.to_fields())
    if incremental is not None:
        body["incremental_streaming_output"] = incremental
    return body


# --------------------------------------------------------------------- (b) engine -> response


def finish_reason_json(out: RequestOutput, completion_tokens: int) -> dict[str, Any] | None:
    if not out.finished:
        return None
    reason = out.finish_reason or "stop"
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    if reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": out.matched_stop}


class NativeOutputWriter:
    """Turns one request's deltas into SGLang chunks (cumulative or incremental) or one response."""

    def __init__(
        self,
        rid: str,
        *,
        prompt_tokens: int,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        token_text: Callable[[int], str] | None = None,
        incremental: bool = False,
    ) -> None:
        self._rid = rid
        self._prompt = prompt_tokens
        self._logprob = return_logprob
        self._top = top_logprobs_num
        self._token_text = token_text
        self._incremental = incremental
        self._text: list[str] = []
        self._ids: list[int] = []
        self._lp: list[list[Any]] = []
        self._top_lp: list[list[list[Any]] | None] = []
        self._cached = 0
        self._max_out = 0
        self._t0 = time.monotonic()

    def _entry(self, token_id: int, logprob: float) -> list[Any]:
        return [logprob, token_id, self._token_text(token_id) if self._token_text is not None else None]

    def add(self, out: RequestOutput) -> None:
        self._text.append(out.new_text)
        self._ids.extend(out.new_token_ids)
        self._cached = max(self._cached, out.num_cached_tokens)
        self._prompt = max(self._prompt, out.num_prompt_tokens)
        self._max_out = max(self._max_out, out.num_output_tokens)
        if self._logprob:
            for lp in out.new_logprobs or ():
                self._lp.append(self._entry(lp.token_id, lp.logprob))
                if self._top:
                    self._top_lp.append([self._entry(t, v) for t, v in lp.top[: self._top]])

    def chunk(self, out: RequestOutput) -> dict[str, Any]:
        """Record ``out`` and return the stream chunk for it."""
        n_lp = len(self._lp)
        self.add(out)
        if self._incremental:
            return self._build(out, out.new_text, list(out.new_token_ids), n_lp)
        return self._build(out, "".join(self._text), list(self._ids), 0)

    def response(self, last: RequestOutput) -> dict[str, Any]:
        """The non-streaming body after every delta was :meth:`add`-ed (``last`` is the final one)."""
        return self._build(last, "".join(self._text), list(self._ids), 0)

    def _build(self, out: RequestOutput, text: str, ids: list[int], lp_from: int) -> dict[str, Any]:
        completion = max(len(self._ids), self._max_out)
        meta: dict[str, Any] = {
            "id": self._rid,
            "finish_reason": finish_reason_json(out, completion),
            "prompt_tokens": self._prompt,
            "completion_tokens": completion,
            "cached_tokens": self._cached,
        }
        if self._logprob:
            meta["output_token_logprobs"] = self._lp[lp_from:]
            if self._top:
                meta["output_top_logprobs"] = self._top_lp[lp_from:]
        if out.finished:
            meta["e2e_latency"] = time.monotonic() - self._t0
        return {"text": text, "output_ids": ids, "meta_info": meta}


# --------------------------------------------------------------------- (c) response -> engine


class NativeOutputParser:
    """Turns a worker's native chunks (ours or real SGLang's) back into :class:`RequestOutput` deltas.

    ``mode="auto"`` detects cumulative vs incremental streams from ``output_ids`` (present in every
    SGLang release since 0.4); pass a mode to force one. Old SGLang ``--stream-output`` servers
    stream incremental ids but cumulative text: use ``text_mode="cumulative"`` for those.
    """

    def __init__(self, request_id: str, *, mode: StreamMode = "auto", text_mode: StreamMode = "auto") -> None:
        self.request_id = request_id
        self._mode: StreamMode = mode
        self._text_mode: StreamMode = text_mode
        self._n_ids = 0
        self._n_text = 0
        self._n_lp = 0
        self._sse = SSEDecoder()
        self.finished = False
        self.done = False  # saw ``data: [DONE]``
        self.abort_message: str | None = None

    def feed_sse(self, data: bytes) -> list[RequestOutput]:
        return [self.feed(orjson.loads(p)) for p in self._sse_payloads(self._sse.feed(data))]

    def finish_sse(self) -> list[RequestOutput]:
        return [self.feed(orjson.loads(p)) for p in self._sse_payloads(self._sse.finish())]

    def _sse_payloads(self, payloads: list[bytes]) -> list[bytes]:
        out = []
        for p in payloads:
            if p.strip() == DONE_PAYLOAD:
                self.done = True
            else:
                out.append(p)
        return out

    def feed(self, obj: Any) -> RequestOutput:
        """One chunk (or a whole non-streaming response) -> the delta since the previous one."""
        if not isinstance(obj, dict):
            raise WorkerError(f"worker sent a non-object chunk: {str(obj)[:200]}")
        if "error" in obj:
            err = obj["error"]
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise WorkerError(f"worker error: {message}", worker_status=_status(err))
        meta = obj.get("meta_info")
        if not isinstance(meta, dict):
            raise WorkerError("worker chunk has no meta_info")
        ids = obj.get("output_ids")
        text = obj.get("text") or ""
        completion = meta.get("completion_tokens")
        mode = self._resolve_mode(ids, completion)
        if ids is None:
            new_ids: list[int] = []
        elif mode == "cumulative":
            new_ids = list(ids[self._n_ids :])
        else:
            new_ids = list(ids)
        self._n_ids += len(new_ids)
        new_text = self._new_text(text, mode)
        logprobs = self._logprobs(meta, mode)
        fr = meta.get("finish_reason")
        finish: str | None = None
        matched: int | str | None = None
        if isinstance(fr, dict):
            finish = fr.get("type") or "stop"
            matched = fr.get("matched")
            if finish == "abort":
                self.abort_message = str(fr.get("message") or "aborted")
            elif finish not in ("stop", "length"):
                finish = "stop"
        self.finished = finish is not None
        n_out = completion if isinstance(completion, int) else self._n_ids
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=self.finished,
            finish_reason=finish,
            matched_stop=matched,
            new_logprobs=logprobs,
            num_prompt_tokens=int(meta.get("prompt_tokens") or 0),
            num_output_tokens=n_out,
            num_cached_tokens=int(meta.get("cached_tokens") or 0),
        )

    def _resolve_mode(self, ids: Any, completion: Any) -> StreamMode:
        if self._mode != "auto" or self._n_ids == 0 or not isinstance(ids, list):
            return "incremental" if self._mode == "auto" else self._mode  # nothing seen: identical
        if isinstance(completion, int):
            self._mode = "cumulative" if len(ids) == completion else "incremental"
        else:
            self._mode = "cumulative" if len(ids) >= self._n_ids else "incremental"
        return self._mode

    def _new_text(self, text: str, ids_mode: StreamMode) -> str:
        mode = self._text_mode if self._text_mode != "auto" else ids_mode
        if mode == "cumulative":
            new = text[self._n_text :]
            self._n_text = len(text)
        else:
            new = text
            self._n_text += len(text)
        return new

    def _logprobs(self, meta: dict[str, Any], mode: StreamMode) -> list[TokenLogprob] | None:
        entries = meta.get("output_token_logprobs")
        if not entries:
            return None
        tops = meta.get("output_top_logprobs") or []
        start = self._n_lp if mode == "cumulative" else 0
        out: list[TokenLogprob] = []
        for i in range(start, len(entries)):
            lp, tid = entries[i][0], entries[i][1]
            top_entries = tops[i] if i < len(tops) and tops[i] else []
            top = [(int(t[1]), float(t[0])) for t in top_entries]
            out.append(TokenLogprob(token_id=int(tid), logprob=float(lp), top=top))
        self._n_lp = len(entries) if mode == "cumulative" else self._n_lp + len(out)
        return out


def _status(err: Any) -> int | None:
    if isinstance(err, dict):
        code = err.get("code", err.get("status_code"))
        if isinstance(code, int):
            return code
    return None
