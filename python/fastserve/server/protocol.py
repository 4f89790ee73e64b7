"""Request bodies of the OpenAI-compatible API as msgspec structs.

Decoding validates types (a wrong type is a 400 naming the field through
`errors.from_validation_error`); value ranges are checked by `SamplingParams` and by the
`check()` methods here. Unknown fields are ignored, as OpenAI and vLLM do, so that clients
sending newer fields keep working."""

from __future__ import annotations

from typing import Any, Union

import msgspec

from .errors import bad_request

from ..limits import (  # noqa: F401 - the request limits, re-exported for the server
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID_LIST,
)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by completions and chat: OpenAI's and vLLM's extra sampling parameters."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    add_special_tokens: bool | None = None
    # vLLM extra: logprob tokens as "token_id:<id>" (ids survive where text is ambiguous)
    return_tokens_as_token_ids: bool = False

    def check_common(self) -> None:
        for name in ("n", "best_of"):
            value = getattr(self, name)
            if value is not None and value > MAX_N:
                raise bad_request(f"{name} is {value}; the most one request may ask for is "
                                  f"{MAX_N}: send several requests instead", name)
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are "
                              "allowed", "stop")
        if any(len(x) > MAX_STOP_STRING_CHARS for x in stop):
            raise bad_request(f"a stop string is longer than {MAX_STOP_STRING_CHARS} "
                              "characters; shorten it", "stop")
        for name in ("stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_TOKEN_ID_LIST:
                raise bad_request(f"{name} holds {len(value)} entries; at most "
                                  f"{MAX_TOKEN_ID_LIST} are allowed", name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        if self.truncate_prompt_tokens is not None and (
                self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1):
            raise bad_request("truncate_prompt_tokens must be a positive number of tokens "
                              "(or -1 for the model's maximum length)", "truncate_prompt_tokens")
        # best_of picks the n best only once all are finished: nothing to stream before.
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must equal n when streaming", "best_of")
        if self.stream and self.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is only returned without streaming",
                              "prompt_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                              f"{self.prompt_logprobs}", "prompt_logprobs")


PromptItem = Union[str, int, list[int]]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Union[str, list[PromptItem]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported; leave it out", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got "
                              f"{self.logprobs}", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids. The four OpenAI forms: a string, a list
        of strings, a list of token ids, a list of token-id lists; mixing them is a 400."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if len(p) > MAX_PROMPTS and not all(isinstance(x, int) for x in p):
            raise bad_request(f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS} go in one "
                              "request: split the batch", "prompt")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) for x in p):
            for i, ids in enumerate(p):
                if not ids:
                    raise bad_request(f"prompt[{i}] is an empty list of token ids", f"prompt[{i}]")
            return [list(x) for x in p]
        raise bad_request("prompt must be a string, a list of strings, a list of token ids, "
                          "or a list of token-id lists (not a mix)", "prompt")


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


def check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    for i, m in enumerate(messages):
        if m.role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"messages[{i}].role must be one of system, developer, user, "
                              f"assistant, tool (got {m.role!r})", f"messages[{i}].role")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}].content[{j}]: only text parts are supported "
                        f"(got type {part.type!r})", f"messages[{i}].content[{j}].type")


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: list content is joined to one string, as vLLM does
    for text-only models."""
    out = []
    for m in messages:
        d = {k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
        if isinstance(m.content, list):
            d["content"] = "\n".join(p.text or "" for p in m.content)
        elif m.content is None:
            d["content"] = ""
        out.append(d)
    return out


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def check(self) -> None:
        self.check_common()
        check_messages(self.messages)
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                                  f"{self.top_logprobs}", "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request("continue_final_message needs add_generation_prompt set to false",
                              "continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs the last message to be the "
                              "assistant's", "continue_final_message")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice other than 'none' or 'auto' is not supported "
                              "(fastserve does not parse tool calls yet)", "tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise bad_request("response_format other than {'type': 'text'} is not supported "
                              "(no guided decoding yet)", "response_format")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("give max_completion_tokens or max_tokens, not both",
                              "max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's /tokenize: either `prompt`, or `messages` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if self.messages is not None:
            check_messages(self.messages)


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]
