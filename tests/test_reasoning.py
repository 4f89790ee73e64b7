"""Reasoning parsers: <think>...</think> split into reasoning_content and content, the same
whether the text arrives whole or in arbitrary stream deltas."""

from __future__ import annotations

import pytest
from fastserve.server.reasoning import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    get_reasoning_parser,
)
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    "cls,text,expected",
    [
        (Qwen3ReasoningParser, "<think>\nplan it\n</think>\n\nThe answer.", ("\nplan it\n", "\n\nThe answer.")),
        (Qwen3ReasoningParser, "No thinking here.", (None, "No thinking here.")),
        (Qwen3ReasoningParser, "<think>cut off mid-thought", ("cut off mid-thought", None)),
        (Qwen3ReasoningParser, "<think></think>answer", (None, "answer")),
        (Qwen3ReasoningParser, "<thin", (None, "<thin")),
        (Qwen3ReasoningParser, "a </think> b", (None, "a </think> b")),
        # DeepSeek-R1's template opens the think block in the prompt: output starts inside it.
        (DeepSeekR1ReasoningParser, "reason first</think>then answer", ("reason first", "then answer")),
        (DeepSeekR1ReasoningParser, "<think>explicit</think>x", ("explicit", "x")),
        (DeepSeekR1ReasoningParser, "never closed", ("never closed", None)),
        (DeepSeekR1ReasoningParser, "ends with partial </thi", ("ends with partial </thi", None)),
    ],
)
def test_parse(cls, text, expected):
    assert cls().parse(text) == expected


def stream(cls, pieces):
    p = cls()
    reasoning, content = [], []
    for piece in pieces:
        r, c = p.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = p.flush()
    return "".join(reasoning) + r, "".join(content) + c


_alphabet = st.sampled_from(["<think>", "</think>", "<", "/", "think", ">", "a", "\n", " ", "é", "</", "<th", "ink>"])


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(_alphabet, max_size=14),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    cls=st.sampled_from([Qwen3ReasoningParser, DeepSeekR1ReasoningParser]),
)
def test_stream_equals_whole(parts, cuts, cls):
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    r, c = stream(cls, pieces)
    whole_r, whole_c = cls().parse(text)
    assert (r or None, c or None) == (whole_r, whole_c)
    # nothing is lost: the parts are the text minus the tags (and leading whitespace before
    # an opening <think>)
    assert len(r) + len(c) <= len(text)


def test_deltas_never_emit_partial_tag():
    p = DeepSeekR1ReasoningParser()
    assert p.feed("abc</th") == ("abc", "")
    assert p.feed("ink>xy") == ("", "xy")
    p = Qwen3ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>r") == ("r", "")


def test_get_reasoning_parser():
    assert get_reasoning_parser(None) is None
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError, match="reasoning_parser"):
        get_reasoning_parser("granite")
