"""Reasoning parsers (`--reasoning-parser qwen3|deepseek_r1`): text inside <think>...</think>
goes to `reasoning_content`, the rest to `content`.

One incremental parser serves both paths: the non-streamed answer is the parser fed the
whole text at once, so a stream's deltas always concatenate to the non-streamed fields.
Text that could be the start of a tag is held back until it can be classified."""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """`reasoning_first`: whether output that does not open with <think> is reasoning until
    </think> (DeepSeek-R1, whose chat template already wrote <think> into the prompt) or
    plain content (Qwen3 with thinking turned off writes no think block at all)."""

    reasoning_first: bool = False

    def __init__(self) -> None:
        self._state = "start"  # start -> reasoning -> content
        self._buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """Returns (reasoning delta, content delta) now safe to emit."""
        self._buf += delta
        reasoning, content = [], []
        while self._buf:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_START):
                    self._buf = stripped[len(THINK_START) :]
                    self._state = "reasoning"
                elif THINK_START.startswith(stripped):
                    break  # could still become <think>
                else:
                    self._state = "reasoning" if self.reasoning_first else "content"
            elif self._state == "reasoning":
                i = self._buf.find(THINK_END)
                if i >= 0:
                    reasoning.append(self._buf[:i])
                    self._buf = self._buf[i + len(THINK_END) :]
                    self._state = "content"
                else:
                    keep = _partial_suffix(self._buf, THINK_END)
                    reasoning.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """At the end of the output: held-back text belongs to the current section."""
        buf, self._buf = self._buf, ""
        if self._state == "reasoning" or (self._state == "start" and self.reasoning_first):
            return buf, ""
        return "", buf

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """Whole output -> (reasoning_content, content), None for an empty part."""
        r1, c1 = self.feed(text)
        r2, c2 = self.flush()
        return (r1 + r2) or None, (c1 + c2) or None


class Qwen3ReasoningParser(ReasoningParser):
    reasoning_first = False


class DeepSeekR1ReasoningParser(ReasoningParser):
    reasoning_first = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
}


def get_reasoning_parser(name: str | None) -> type[ReasoningParser] | None:
    if name is None:
        return None
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got {name!r}") from None
