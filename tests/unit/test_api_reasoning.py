"""glm45 reasoning parser: streaming == non-streaming for every chunking; no partial tags leak."""

from __future__ import annotations

import random

import pytest

from pdserve.api.reasoning import (
    Glm45ReasoningParser,
    StartState,
    held_suffix_len,
    split_reasoning,
    start_state_for_prompt,
)

pytestmark = pytest.mark.unit

CASES: list[tuple[str, StartState, str, str]] = [
    # text, start state, expected reasoning, expected content
    ("<think>Let me think.</think>The answer is 4.", "auto", "Let me think.", "The answer is 4."),
    ("\n<think>\nstep 1\nstep 2\n</think>\n\nAnswer.", "auto", "step 1\nstep 2", "Answer."),
    ("No thinking here.", "auto", "", "No thinking here."),
    ("  plain", "auto", "", "plain"),
    ("<thinking is not a tag> ok", "auto", "", "<thinking is not a tag> ok"),
    ("<think></think>Direct.", "auto", "", "Direct."),
    ("<think>unterminated reasoning <", "auto", "unterminated reasoning <", ""),
    ("<think>a </thin b</think>c", "auto", "a </thin b", "c"),
    ("inside already</think>then content", "reasoning", "inside already", "then content"),
    ("\nall content <think>x</think>", "content", "", "all content <think>x</think>"),
    ("<think>x</think>", "content", "", "<think>x</think>"),
    ("", "auto", "", ""),
    ("<thi", "auto", "", "<thi"),
    ("<think>", "auto", "", ""),
    ("r1 \n r2  </think>  c1 \n c2 ", "reasoning", "r1 \n r2", "c1 \n c2 "),
    ("<think>多语言 ✓</think>答案", "auto", "多语言 ✓", "答案"),
]


def _stream(text: str, start: StartState, chunks: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    parser = Glm45ReasoningParser(start)
    deltas = [parser.feed(c) for c in chunks]
    deltas.append(parser.finish())
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas), deltas


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), CASES)
def test_non_streaming(text: str, start: StartState, reasoning: str, content: str) -> None:
    assert split_reasoning(text, start) == (reasoning, content)


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), CASES)
def test_every_split_point_and_char_by_char(
    text: str, start: StartState, reasoning: str, content: str
) -> None:
    for cut in range(len(text) + 1):
        r, c, _ = _stream(text, start, [text[:cut], text[cut:]])
        assert (r, c) == (reasoning, content), cut
    r, c, _ = _stream(text, start, list(text))
    assert (r, c) == (reasoning, content)


@pytest.mark.parametrize(("text", "start", "reasoning", "content"), CASES)
def test_random_chunkings(text: str, start: StartState, reasoning: str, content: str) -> None:
    rng = random.Random(1234)
    for _ in range(30):
        r, c, _ = _stream(text, start, _random_chunks(text, rng))
        assert (r, c) == (reasoning, content)


def test_no_partial_tag_ever_leaks_into_a_delta() -> None:
    text = "<think>abc</think>xyz"
    _, _, deltas = _stream(text, "auto", list(text))
    for r, c in deltas:
        for piece in (r, c):
            assert "<" not in piece and ">" not in piece


def test_reasoning_is_streamed_incrementally_not_at_the_end() -> None:
    parser = Glm45ReasoningParser("auto")
    assert parser.feed("<think>first") == ("first", "")
    assert parser.feed(" second") == (" second", "")
    assert parser.in_reasoning
    assert parser.feed("</think>done") == ("", "done")
    assert not parser.in_reasoning
    assert parser.feed(" more") == ("", " more")


def test_held_suffix_len() -> None:
    assert held_suffix_len("abc</th", ("</think>",)) == 4
    assert held_suffix_len("abc<", ("</think>",)) == 1
    assert held_suffix_len("abc</think", ("</think>",)) == 7
    assert held_suffix_len("abc</x", ("</think>",)) == 0
    assert held_suffix_len("a<tool_c", ("<arg_key>", "<tool_call>")) == 7
    assert held_suffix_len("", ("<x>",)) == 0


@pytest.mark.parametrize(
    ("prompt", "state"),
    [
        ("[gMASK]<sop><|user|>\nhi<|assistant|>", "auto"),
        ("[gMASK]<sop><|user|>\nhi<|assistant|>\n<think></think>", "content"),
        ("[gMASK]<sop><|user|>\nhi<|assistant|><think>", "reasoning"),
        ("<|assistant|>\n<think>old</think>done<|user|>\nq<|assistant|>", "auto"),
        ("<|assistant|>\n<think>old</think>done<|user|>\nq<|assistant|><think>", "reasoning"),
    ],
)
def test_start_state_for_prompt(prompt: str, state: str) -> None:
    assert start_state_for_prompt(prompt) == state
