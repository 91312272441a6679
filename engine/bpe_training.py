"""Train the default model's byte-level BPE tokenizer (deterministic, ~2 s on one core).

1. Corpus: the Python standard library's top-level ``*.py`` sources in sorted file-name order,
   whole files until about 3 MB, plus a short built-in multilingual passage (so that some merges
   span multi-byte characters, which exercises streaming detokenisation).
2. Model: GLM-4's scheme — split by the cl100k-style regex, then byte-level (no prefix space), a
   BPE trained to ``vocab_size - len(GLM_ADDED_TOKENS)`` entries over the full 256-byte alphabet.
3. GLM's added tokens are appended after the trained vocabulary in GLM-4.5's order: control
   tokens flagged special (skipped by ``skip_special_tokens``), markup tokens (``<think>``,
   ``<tool_call>``, ...) as non-special added tokens so reasoning/tool parsers see them in text.

The same corpus and settings give a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

# GLM-4.5's added tokens, in its id order. Control tokens (special=True) first.
GLM_CONTROL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
)
GLM_MARKUP_TOKENS = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)
GLM_ADDED_TOKENS = GLM_CONTROL_TOKENS + GLM_MARKUP_TOKENS

# GLM-4 / cl100k pre-tokenisation split.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_VOCAB_SIZE = 8192
CORPUS_MAX_CHARS = 3_000_000

_MULTILINGUAL = (
    "你好，世界！今天的天气很好，我们一起去公园散步吧。机器学习模型需要大量的数据和计算资源。\n"
    "分布式推理系统把预填充和解码分开，以提高吞吐量并降低首个词元的延迟。\n"
    "こんにちは、世界。東京は今日も晴れです。日本語の文章も少し入れておきます。\n"
    "Привет, мир! Это небольшой пример текста на русском языке.\n"
    "Emoji test: 🙂 🎉 🚀 👍🏽 ❤️ 🇫🇷 — naïve café, façade, Zürich, São Paulo, 1½ ≤ 2 ≠ π.\n"
)


def stdlib_corpus(max_chars: int = CORPUS_MAX_CHARS) -> list[str]:
    """The training texts: sorted stdlib sources (whole files, up to ``max_chars``) + a
    multilingual passage repeated 50 times."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for file in sorted(stdlib.glob("*.py"), key=lambda p: p.name):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if total < 200_000:
        raise ConfigError(
            f"cannot train the default tokenizer: found only {total} characters of Python sources in "
            f"{stdlib} (is the standard library's source installed?)"
        )
    texts.extend([_MULTILINGUAL] * 50)
    return texts


def train_bpe_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, *, max_chars: int = CORPUS_MAX_CHARS
) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer with GLM's added tokens; ``vocab_size`` includes them."""
    n_added = len(GLM_ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise ConfigError(f"tokenizer vocab_size must be > {256 + n_added}, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = stdlib_corpus(max_chars)
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in GLM_CONTROL_TOKENS
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in GLM_MARKUP_TOKENS
    ])
    logger.info("trained byte-level BPE tokenizer: %d tokens", tok.get_vocab_size(with_added_tokens=True))
    return tok
