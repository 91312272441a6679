"""Tokenizer loading, encode/decode parity with transformers, and streaming detokenisation."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from pdserve.engine.default_model import ensure_default_model
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import InvalidRequestError, ModelLoadError

pytestmark = pytest.mark.unit

TEXTS = [
    "def f(x):\n    return x * 2  # double\n",
    "你好，世界！今天天气很好。",
    "Emoji: 🙂🎉🚀 family 👨‍👩‍👧‍👦 skin 👍🏽 flag 🇫🇷 keycap 1️⃣",
    "naïve café — Zürich, 1½ ≤ 2 ≠ π, Привет мир, こんにちは",
    "mixed 中文 and English 和 emoji 😀 in one line\n\ttabs\r\nCRLF",
    "<|user|>control tokens<|assistant|><think>thinking</think><tool_call>f\n<arg_key>k</arg_key>",
    "",
    " leading and trailing spaces  ",
    "\U0001f9ea\U0010ffff\u0301e\u200b zero-width",
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.getbasetemp() / "pdserve-cache")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))


def _random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0400, 0x04FF), (0x3040, 0x30FF),
             (0xA0, 0x24F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_loads_vocab_and_special_tokens(tok: Tokenizer, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert tok.vocab_size == len(tok) == 8192
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= tok.vocab_size
    stops = {tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert None not in stops
    assert set(tok.eos_token_ids) == stops == set(config["eos_token_id"])
    assert tok.eos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    for control in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"):
        assert tok.token_to_id(control) in tok.special_ids
    for markup in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>"):
        tid = tok.token_to_id(markup)
        assert tid is not None and tid not in tok.special_ids  # visible to reasoning/tool parsers
    assert tok.chat_template is not None and tok.model_max_length == 8192
    assert tok.id_to_token(tok.token_to_id("<think>") or 0) == "<think>"


def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok: Any) -> None:
    rng = random.Random(0)
    texts = TEXTS + [_random_text(rng, rng.randint(1, 200)) for _ in range(50)]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.encode_batch(texts[:4]) == [tok.encode(t) for t in texts[:4]]


def test_utf8_round_trip(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for text in TEXTS + [_random_text(rng, 300) for _ in range(30)]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_validation(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError):
        tok.decode([1, -2])
    # ids past the tokenizer (a model's padded vocabulary rows) decode to nothing
    assert tok.decode([tok.vocab_size + 5, *tok.encode("ok")]) == "ok"
    with pytest.raises(InvalidRequestError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def _stream(tok: Tokenizer, ids: list[int], chunks: list[int], **kw: Any) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, **kw)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.add(ids[pos:]))
    tail = detok.finish()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("strategy", ["byte_level", "windowed"])
def test_incremental_detokenizer_is_exact_and_never_emits_partial_chars(
    tok: Tokenizer, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if strategy == "windowed":
        monkeypatch.setattr(tok, "byte_table", lambda: None)
    rng = random.Random(2)
    texts = TEXTS + [_random_text(rng, rng.randint(5, 120)) for _ in range(40)]
    split_chars = 0
    for text in texts:
        ids = tok.encode(text)
        split_chars += sum(1 for i in ids if "\ufffd" in tok.decode([i]))
        for skip in (True, False):
            for chunking in ("one", "random"):
                chunks = [1] * len(ids) if chunking == "one" else [rng.randint(1, 4) for _ in range(len(ids))]
                deltas, tail = _stream(tok, ids, chunks, skip_special_tokens=skip)
                assert all("\ufffd" not in d for d in deltas), (text, deltas)
                assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
                assert tail == ""  # valid UTF-8: nothing left to flush
    assert split_chars > 50  # the texts really do split characters across tokens
    assert IncrementalDetokenizer(tok).byte_level is (strategy == "byte_level")


def test_incremental_detokenizer_invalid_bytes_match_decode(tok: Tokenizer) -> None:
    """Arbitrary id sequences (invalid UTF-8 included) stream to exactly decode()'s text."""
    table = tok.byte_table()
    assert table is not None
    single_bytes = [i for i, b in enumerate(table) if len(b) == 1 and b[0] >= 0x80]
    assert len(single_bytes) == 128
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.choice(single_bytes) if rng.random() < 0.7 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 12))]
        deltas, tail = _stream(tok, ids, [1] * len(ids), skip_special_tokens=False)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_incremental_detokenizer_holds_until_complete(tok: Tokenizer) -> None:
    table = tok.byte_table()
    assert table is not None
    byte_id = {b[0]: i for i, b in enumerate(table) if len(b) == 1}
    emoji = "🚀".encode()
    ids = [*tok.encode("go "), *(byte_id[b] for b in emoji), *tok.encode("!")]
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    assert out[-5:-2] == ["", "", ""] and out[-2] == "🚀" and out[-1] == "!"
    assert detok.num_tokens == len(ids)
    # a dangling partial character is flushed as U+FFFD at the end
    dangling = tok.detokenizer()
    assert dangling.add([byte_id[emoji[0]], byte_id[emoji[1]]]) == ""
    assert dangling.finish() == "\ufffd"
    assert dangling.finish() == ""
    with pytest.raises(RuntimeError):
        dangling.add([1])
    # the prompt ending inside a character: the first output completes it
    seeded = tok.detokenizer(prompt_ids=[*tok.encode("x"), byte_id[emoji[0]], byte_id[emoji[1]]])
    assert seeded.add([byte_id[emoji[2]]]) == ""
    assert seeded.add([byte_id[emoji[3]]]) == "🚀"


def test_windowed_prompt_context(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok, "byte_table", lambda: None)
    prompt = tok.encode("The answer is")
    ids = tok.encode(" 42, 你好 🙂")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    streamed = "".join(detok.add(i) for i in ids) + detok.finish()
    assert streamed == " 42, 你好 🙂"


def test_chat_templates_precedence(model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copy(model_dir / name, d / name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                            {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "Dx"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]) == "T1"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"
    (d / "chat_template.jinja").write_text("F{{ messages | length }}")
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "F1"  # the file wins, as in transformers


def test_load_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    no_template = Tokenizer.from_dir(tmp_path)  # tokenizer.json alone is enough
    assert no_template.eos_token_ids  # GLM stop tokens found in the vocabulary
    with pytest.raises(InvalidRequestError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ModelLoadError, match="chat template"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [10**7]}))
    with pytest.raises(ModelLoadError, match="outside the tokenizer vocabulary"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_dir(tmp_path)
