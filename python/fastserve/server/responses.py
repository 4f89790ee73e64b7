"""Format the response: engine outputs -> the OpenAI/vLLM JSON of chat and completions, whole
(`body`) or as stream chunks (`Chat.chunks`, `Completions.chunks`).

The one place these bodies are built: the server's routes and `fastserve run-batch` both
answer from here, so a batch line holds exactly what the server would answer for its body."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

# vLLM's floor for a reported logprob (a grammar-masked token's is -inf, which JSON lacks).
MIN_LOGPROB = -9999.0


def random_id(prefix: str, request_id: str | None = None) -> str:
    """`prefix-<random>`, or `prefix-<request_id>` when the client named it (vLLM's rule)."""
    return f"{prefix}-{request_id if request_id else uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    u = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def token_str(tokenizer, token_id: int, logprob, as_id: bool = False) -> str:
    if as_id:
        return f"token_id:{token_id}"
    s = getattr(logprob, "decoded_token", None)
    if s is None:
        s = tokenizer.decode([token_id], skip_special_tokens=False)
    return s


def prompt_logprobs_json(out) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, {token id: {logprob, rank,
    decoded_token}} of the token and the top alternatives (None for the first token)."""
    if out.prompt_logprobs is None:
        return None
    return [
        None
        if step is None
        else {
            str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tid, lp in step.items()
        }
        for step in out.prompt_logprobs
    ]


def top_entries(step: dict, k: int) -> list[tuple[int, Any]]:
    """The k most likely (token id, Logprob) of one step, best first."""
    ranked = sorted(step.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 1 << 30, -kv[1].logprob))
    return ranked[:k]


# -- chat ---------------------------------------------------------------------------------------


def _chat_entry(tokenizer, token_id: int, lp, as_id: bool) -> dict:
    s = token_str(tokenizer, token_id, lp, as_id)
    return {
        "token": s,
        "logprob": max(lp.logprob, MIN_LOGPROB) if lp is not None else None,
        "bytes": list(s.encode("utf-8")),
    }


def chat_logprobs(tokenizer, steps: list[dict], token_ids: list[int], k: int, as_ids: bool) -> dict:
    content = []
    for tid, step in zip(token_ids, steps):
        e = _chat_entry(tokenizer, tid, step.get(tid), as_ids)
        e["top_logprobs"] = [_chat_entry(tokenizer, t, lp, as_ids) for t, lp in top_entries(step, k)]
        content.append(e)
    return {"content": content}


def chat_echo_prefix(req) -> str:
    """vLLM's chat echo: the new message starts with the last message's content when that
    message is the assistant's (the role being answered)."""
    if not req.echo or req.messages[-1].role != "assistant":
        return ""
    content = req.messages[-1].content
    if isinstance(content, list):
        return "\n".join(p.text or "" for p in content)
    return content or ""


@dataclass
class Chat:
    """One chat request's answer. `reasoning_parser`: the parser class used for this request
    (None when off or thinking is switched off); `reasoning_content`: whether the server has
    a parser at all (then messages carry vLLM's `reasoning_content` too); `tools`: the
    request's ToolCalling or None."""

    req: Any
    tokenizer: Any
    request_id: str
    created: int
    model: str
    prompt_ids: list[int]
    prompt_text: str
    reasoning_parser: Any = None
    reasoning_content: bool = False
    tools: Any = None
    role: str = "assistant"
    # stream state
    _sent_text: dict = field(init=False, default_factory=dict)
    _sent_tokens: dict = field(init=False, default_factory=dict)
    _done: set = field(init=False, default_factory=set)
    _parsers: dict = field(init=False, default_factory=dict)
    _streamers: dict = field(init=False, default_factory=dict)
    _called: dict = field(init=False, default_factory=dict)
    _completion_tokens: int = field(init=False, default=0)
    _first_chunk: bool = field(init=False, default=True)

    @property
    def top_k(self) -> int | None:
        """The logprobs count, or None when the request did not ask for logprobs."""
        return (self.req.top_logprobs or 0) if self.req.logprobs else None

    def _logprobs(self, steps, token_ids) -> dict:
        return chat_logprobs(self.tokenizer, steps, token_ids, self.top_k, self.req.return_tokens_as_token_ids)

    def _message(self, content, reasoning, tool_calls: list[dict]) -> dict:
        m = {
            "role": self.role,
            "content": content,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        if tool_calls:
            m["tool_calls"] = tool_calls
        m["reasoning"] = reasoning
        if self.reasoning_content:
            m["reasoning_content"] = reasoning
        return m

    def body(self, final) -> tuple[dict, int]:
        """The whole answer from the request's final output, and its completion tokens."""
        req = self.req
        choices, completion_tokens = [], 0
        echo = chat_echo_prefix(req)
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            reasoning, content = None, o.text
            if self.reasoning_parser is not None:
                reasoning, content = self.reasoning_parser().parse(o.text)
            if not req.include_reasoning:
                reasoning = None
            tool_calls, finish_reason = [], o.finish_reason
            if self.tools is not None:
                content, tool_calls, called = self.tools.message(content)
                finish_reason = self.tools.finish_reason(o.finish_reason, called)
            if echo:
                content = echo + (content or "")
            choices.append(
                {
                    "index": o.index,
                    "message": self._message(content, reasoning, tool_calls),
                    "logprobs": self._logprobs(o.logprobs or [], o.token_ids) if self.top_k is not None else None,
                    "finish_reason": finish_reason,
                    "stop_reason": o.stop_reason,
                    "token_ids": list(o.token_ids) if req.return_token_ids else None,
                }
            )
        return (
            {
                "id": self.request_id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage(len(self.prompt_ids), completion_tokens, getattr(final, "num_cached_tokens", None)),
                "prompt_logprobs": prompt_logprobs_json(final),
                "prompt_token_ids": list(self.prompt_ids) if req.return_token_ids else None,
                "prompt_text": self.prompt_text if req.return_prompt_text else None,
            },
            completion_tokens,
        )

    # -- streaming --

    @property
    def _include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def _base(self) -> dict:
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(
        self, index: int, delta: dict, finish_reason=None, stop_reason=None, logprobs=None, token_ids=None
    ) -> dict:
        req = self.req
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason:
            choice["stop_reason"] = stop_reason
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        c = {**self._base(), "choices": [choice]}
        if req.return_token_ids and self._first_chunk:
            c["prompt_token_ids"] = list(self.prompt_ids)
        if req.return_prompt_text and self._first_chunk:
            c["prompt_text"] = self.prompt_text
        self._first_chunk = False
        if self._include_usage:  # OpenAI: null on every chunk but the last, unless continuous
            c["usage"] = (
                usage(len(self.prompt_ids), sum(self._sent_tokens.values()))
                if self.req.stream_options.continuous_usage_stats
                else None
            )
        return c

    def _split(self, index: int, delta_text: str, final: bool) -> dict:
        req = self.req
        reasoning, content = "", delta_text
        if self.reasoning_parser is not None:
            p = self._parsers.setdefault(index, self.reasoning_parser())
            reasoning, content = p.feed(delta_text)
            if final:
                r2, c2 = p.flush()
                reasoning, content = reasoning + r2, content + c2
            if not req.include_reasoning:
                reasoning = ""
        d = {}
        if reasoning:
            d["reasoning"] = reasoning
            if self.reasoning_content:
                d["reasoning_content"] = reasoning
        if self.tools is not None:
            s = self._streamers.setdefault(index, self.tools.streamer())
            content, calls = s.feed(content)
            if final:
                c2, calls2 = s.finish()
                content, calls = content + c2, calls + calls2
            if calls and self.tools.parallel_tool_calls is False:
                calls = [c for c in calls if c["index"] == 0]
            if calls:
                self._called[index] = True
                d["tool_calls"] = calls
        if content:
            d["content"] = content
        return d

    def opening(self) -> list[dict]:
        """OpenAI opens every choice with the role and empty content (or the echo)."""
        echo = chat_echo_prefix(self.req)
        out = []
        for i in range(self.req.n):
            self._sent_text[i] = self._sent_tokens[i] = 0
            out.append(self._chunk(i, {"role": self.role, "content": echo}))
        return out

    def chunks(self, out) -> list[dict]:
        """The chunks one engine output adds to the stream."""
        top_k = self.top_k
        chunks = []
        for o in out.outputs:
            i = o.index
            if i in self._done:
                continue
            t0, k0 = self._sent_text[i], self._sent_tokens[i]
            finished = o.finish_reason is not None
            delta = self._split(i, o.text[t0:], finished)
            new_ids = o.token_ids[k0:]
            self._sent_text[i], self._sent_tokens[i] = len(o.text), len(o.token_ids)
            if delta or (top_k is not None and new_ids):
                lp = self._logprobs((o.logprobs or [])[k0:], new_ids) if top_k is not None else None
                chunks.append(self._chunk(i, delta, logprobs=lp, token_ids=list(new_ids)))
                new_ids = []
            if finished:
                self._done.add(i)
                self._completion_tokens += len(o.token_ids)
                reason = o.finish_reason
                if self.tools is not None:
                    reason = self.tools.finish_reason(o.finish_reason, self._called.get(i, False))
                chunks.append(self._chunk(i, {}, reason, o.stop_reason, token_ids=list(new_ids)))
        return chunks

    def closing(self) -> list[dict]:
        if not self._include_usage:
            return []
        return [{**self._base(), "choices": [], "usage": usage(len(self.prompt_ids), self._completion_tokens)}]


# -- completions --------------------------------------------------------------------------------


def completion_logprobs(tokenizer, steps: list, token_ids: list[int], k: int, offset: int, as_ids: bool) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
    `offset` is the text length before these tokens (text_offset counts from the choice's
    start). A step of None (the first prompt token under echo) has no logprob."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tid, step in zip(token_ids, steps):
        if step is None:
            s = f"token_id:{tid}" if as_ids else tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append(s)
            token_logprobs.append(None)
            tops.append(None)
            offsets.append(offset)
            offset += len(s)
            continue
        chosen = step.get(tid)
        s = token_str(tokenizer, tid, chosen, as_ids)
        tokens.append(s)
        token_logprobs.append(max(chosen.logprob, MIN_LOGPROB) if chosen is not None else None)
        # vLLM's rule: the sampled token, then the top k, so up to k + 1 entries.
        top = {} if chosen is None else {s: max(chosen.logprob, MIN_LOGPROB)}
        for t, lp in top_entries(step, k):
            top.setdefault(token_str(tokenizer, t, lp, as_ids), max(lp.logprob, MIN_LOGPROB))
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


@dataclass
class Completions:
    """One completions request's answer over its prompts (choice index = prompt index * n +
    sample index, as OpenAI and vLLM number them). `echo_k`: the logprobs count of echoed
    prompt tokens (from prompt logprobs), or None."""

    req: Any
    tokenizer: Any
    request_id: str
    created: int
    model: str
    prompt_ids: list[list[int]]
    prompt_texts: list[str | None]
    echo_k: int | None = None
    _sent_text: dict = field(init=False, default_factory=dict)  # choice index -> characters sent; -1 once finished
    _sent_tokens: dict = field(init=False, default_factory=dict)
    _completion_tokens: int = field(init=False, default=0)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    def _base(self) -> dict:
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model}

    def echo_text(self, i: int) -> str:
        if not self.req.echo:
            return ""
        text = self.prompt_texts[i]
        return text if text is not None else self.tokenizer.decode(self.prompt_ids[i])

    def _logprobs(self, steps, token_ids, offset: int) -> dict:
        return completion_logprobs(
            self.tokenizer, steps, token_ids, self.req.logprobs, offset, self.req.return_tokens_as_token_ids
        )

    def _echo_logprobs(self, i: int, out) -> dict | None:
        """The prompt's entries of an echoed choice's logprobs (first prompt token: null)."""
        if self.echo_k is None or out.prompt_logprobs is None:
            return None
        return completion_logprobs(
            self.tokenizer, out.prompt_logprobs, self.prompt_ids[i], self.echo_k, 0, self.req.return_tokens_as_token_ids
        )

    def body(self, finals: dict[int, Any]) -> tuple[dict, int]:
        """The whole answer from each prompt's final output, and its completion tokens."""
        req = self.req
        choices, completion_tokens = [], 0
        for i in range(len(self.prompt_ids)):
            prefix = self.echo_text(i)
            for o in sorted(finals[i].outputs, key=lambda o: o.index):
                completion_tokens += len(o.token_ids)
                lp = None
                if req.logprobs is not None:
                    lp = self._logprobs(o.logprobs or [], o.token_ids, len(prefix))
                    if (echoed := self._echo_logprobs(i, finals[i])) is not None:
                        lp = _merge_logprobs(echoed, lp)
                choices.append(
                    {
                        "index": i * req.n + o.index,
                        "text": prefix + o.text,
                        "logprobs": lp,
                        "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason,
                        "token_ids": list(o.token_ids) if req.return_token_ids else None,
                        "prompt_logprobs": prompt_logprobs_json(finals[i]),
                        "prompt_token_ids": list(self.prompt_ids[i]) if req.return_token_ids else None,
                    }
                )
        return (
            {
                **self._base(),
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage(self.num_prompt_tokens, completion_tokens),
            },
            completion_tokens,
        )

    # -- streaming --

    def chunks(self, i: int, out) -> list[dict]:
        """The chunks prompt `i`'s engine output adds to the stream."""
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = []
        for o in out.outputs:
            idx = i * req.n + o.index
            if self._sent_text.get(idx) == -1:
                continue
            first = idx not in self._sent_text
            t0, k0 = self._sent_text.get(idx, 0), self._sent_tokens.get(idx, 0)
            delta = o.text[t0:]
            new_ids = o.token_ids[k0:]
            if not delta and not new_ids and o.finish_reason is None and not first:
                continue
            prefix = self.echo_text(i) if first else ""
            chunk = {
                "index": idx,
                "text": prefix + delta,
                "logprobs": None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            if req.return_token_ids:
                chunk["token_ids"] = list(new_ids)
                if first:
                    chunk["prompt_token_ids"] = list(self.prompt_ids[i])
            if req.logprobs is not None:
                chunk["logprobs"] = self._logprobs((o.logprobs or [])[k0:], new_ids, len(prefix) + t0)
                if first and (echoed := self._echo_logprobs(i, out)) is not None:
                    chunk["logprobs"] = _merge_logprobs(echoed, chunk["logprobs"])
            self._sent_text[idx] = len(o.text) if o.finish_reason is None else -1
            self._sent_tokens[idx] = len(o.token_ids)
            if o.finish_reason is not None:
                self._completion_tokens += len(o.token_ids)
            extra = {}
            if include_usage:  # OpenAI: null on every chunk but the last, unless continuous
                extra["usage"] = (
                    usage(self.num_prompt_tokens, sum(self._sent_tokens.values()))
                    if req.stream_options.continuous_usage_stats
                    else None
                )
            chunks.append({**self._base(), "choices": [chunk], **extra})
        return chunks

    def closing(self) -> list[dict]:
        if not (self.req.stream_options and self.req.stream_options.include_usage):
            return []
        return [{**self._base(), "choices": [], "usage": usage(self.num_prompt_tokens, self._completion_tokens)}]
