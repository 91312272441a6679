"""The tokenizer of a HF checkpoint directory, loaded with the ``tokenizers`` library alone.

``Tokenizer.from_dir(path)`` reads what transformers reads for a fast tokenizer:

1. ``tokenizer.json`` (the model, pre-tokenizer, decoder and added tokens);
2. ``tokenizer_config.json`` (named special tokens such as ``eos_token``, ``model_max_length``,
   and ``chat_template``: a string or a list of ``{"name", "template"}``), with
   ``special_tokens_map.json`` filling named special tokens it lacks;
3. ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``, which replace the config's
   templates when present (transformers' precedence);
4. ``generation_config.json`` and ``config.json`` for ``eos_token_id`` (an int or a list).

``eos_token_ids`` is the union of those EOS ids, the tokenizer's ``eos_token`` and the GLM stop
tokens ``<|endoftext|>``, ``<|user|>``, ``<|observation|>`` where the vocabulary has them.
Chat rendering matches ``PreTrainedTokenizerFast.apply_chat_template(..., tokenize=False)``
(see :mod:`pdserve.engine.chat_render`). A missing or garbled file raises
:class:`~pdserve.errors.ModelLoadError`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import tokenizers.decoders

from pdserve.engine.chat_render import ChatTemplateRenderer
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

__all__ = ["GLM_STOP_TOKENS", "IncrementalDetokenizer", "Tokenizer", "byte_level_char_map"]

GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)


def byte_level_char_map() -> dict[str, int]:
    """GPT-2 byte-level alphabet: the printable character standing for each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _read_json_if_present(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _eos_ids(value: Any, source: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelLoadError(f"{source}: eos_token_id must be a non-negative int or a list of them")
    return [int(v) for v in values]


def _load_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    templates: dict[str, str] = {}
    single = path / "chat_template.jinja"
    if single.is_file():
        templates["default"] = single.read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        for entry in value:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ModelLoadError(f"{path}: chat_template entries must be {{'name', 'template'}} objects")
            templates[str(entry["name"])] = str(entry["template"])
        return templates
    if value is not None:
        raise ModelLoadError(f"{path}: chat_template must be a string or a list of named templates")
    return {}


class Tokenizer:
    """Encode/decode, special-token facts and chat templating for one checkpoint.

    ``vocab_size`` counts every token id the tokenizer knows, added tokens included (transformers'
    ``len(tokenizer)``); a model's embedding may be larger (padded). ``special_ids`` are the added
    tokens flagged special: what ``skip_special_tokens`` drops. (GLM flags the control tokens
    ``[gMASK]``, ``<|user|>``, ... special but keeps ``<think>``, ``<tool_call>``, ... visible.)
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        model_max_length: int | None = None,
        name: str = "",
    ) -> None:
        self._backend = backend
        self.name = name
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.model_max_length = model_max_length
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        self.added_tokens: dict[str, int] = {tok.content: i for i, tok in added.items()}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self._renderer = ChatTemplateRenderer()
        for template_name, source in self.chat_templates.items():
            try:
                self._renderer.compile(source)
            except InvalidRequestError as exc:
                raise ModelLoadError(
                    f"{name or 'tokenizer'}: chat template {template_name!r}: {exc}"
                ) from exc
        eos: list[int] = []
        candidates = [*eos_token_ids, self._id_of(self.special_tokens.get("eos_token"))]
        candidates += [self._id_of(tok) for tok in GLM_STOP_TOKENS]
        for tid in candidates:
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))
        self.eos_token_id: int | None = self._id_of(self.special_tokens.get("eos_token"))
        if self.eos_token_id is None and self.eos_token_ids:
            self.eos_token_id = self.eos_token_ids[0]
        self.pad_token_id: int | None = self._id_of(self.special_tokens.get("pad_token"))
        self._byte_table: list[bytes] | None = None
        self._byte_table_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{root}: no tokenizer.json (a fast tokenizer is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelLoadError(f"cannot load {tok_file}: {exc}") from exc
        config = _read_json_if_present(root / "tokenizer_config.json")
        legacy = _read_json_if_present(root / "special_tokens_map.json")
        special: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(key))
            if content is None and key not in config:
                content = _token_content(legacy.get(key))
            if content is not None:
                special[key] = content
        eos: list[int] = []
        for file in ("generation_config.json", "config.json"):
            if (root / file).is_file():
                eos += _eos_ids(_read_json(root / file).get("eos_token_id"), root / file)
        max_len = config.get("model_max_length")
        model_max_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
        try:
            templates = _load_chat_templates(root, config)
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{root}: cannot read chat template: {exc}") from exc
        vocab = backend.get_vocab_size(with_added_tokens=True)
        bad = [i for i in eos if i >= vocab]
        if bad:
            raise ModelLoadError(f"{root}: eos_token_id {bad} outside the tokenizer vocabulary ({vocab})")
        return cls(backend, chat_templates=templates, special_tokens=special, eos_token_ids=eos,
                   model_max_length=model_max_length, name=str(root))

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def __len__(self) -> int:
        return self.vocab_size

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def chat_template(self) -> str | None:
        """The default template (``None`` when the checkpoint has none)."""
        return self.chat_templates.get("default")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encs = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids the vocabulary lacks (a model's padded rows) decode to nothing."""
        ids = list(ids)
        if ids and min(ids) < 0:
            raise InvalidRequestError(f"token ids must be non-negative, got {min(ids)}")
        return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def byte_table(self) -> list[bytes] | None:
        """Per-id raw bytes when the decoder is plain byte-level (decode == UTF-8 of the joined
        bytes); ``None`` otherwise. Built once per tokenizer, on first use."""
        if not isinstance(self._backend.decoder, tokenizers.decoders.ByteLevel):
            return None
        with self._byte_table_lock:
            if self._byte_table is None:
                chars = byte_level_char_map()
                table: list[bytes] = []
                for i in range(self.vocab_size):
                    tok = self._backend.id_to_token(i)
                    if tok is None:
                        table.append(b"")
                    elif all(c in chars for c in tok):
                        table.append(bytes(chars[c] for c in tok))
                    else:
                        table.append(tok.encode("utf-8"))
                self._byte_table = table
            return self._byte_table

    def detokenizer(
        self, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """Template source: a named template, the given source, ``tool_use`` when tools are
        given and the checkpoint has one, else ``default``."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise InvalidRequestError(
                f"the model has several chat templates and no default: {sorted(self.chat_templates)}"
            )
        raise InvalidRequestError("the model has no chat template; send a prompt instead of messages")

    def apply_chat_template(
        self,
        messages: Iterable[Any],
        tools: Iterable[Any] | None = None,
        add_generation_prompt: bool = True,
        *,
        documents: Iterable[Any] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        parse_tool_arguments: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text. ``template_kwargs`` and ``chat_template_kwargs`` (a request's dict,
        passed whole so its keys cannot collide with parameters) are template variables such as
        ``enable_thinking`` / ``clear_thinking``. Tool-call ``arguments`` given as JSON strings are
        parsed to objects first unless ``parse_tool_arguments`` is false. Errors (including a
        kwarg named like a reserved template variable) raise ``InvalidRequestError``."""
        source = self.get_chat_template(chat_template, tools)
        variables = {**dict(chat_template_kwargs or {}), **template_kwargs}
        return self._renderer.render(
            source,
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            special_tokens=self.special_tokens,
            parse_tool_arguments=parse_tool_arguments,
            template_kwargs=variables,
        )

    def encode_chat(
        self,
        messages: Iterable[Any],
        tools: Iterable[Any] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """``encode(apply_chat_template(...))`` (the template writes every control token)."""
        text = self.apply_chat_template(messages, tools, add_generation_prompt, **template_kwargs)
        return self.encode(text)
