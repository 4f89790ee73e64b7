"""Request bodies of the OpenAI-compatible API as msgspec structs.

Decoding validates types (a wrong type is a 400 naming the field through
`errors.from_validation_error`); value ranges are checked by `SamplingParams` and by the
`check()` methods here. Unknown fields are ignored, as OpenAI and vLLM do, so that clients
sending newer fields keep working."""

from __future__ import annotations

from typing import Any

import msgspec

from ..limits import (  # noqa: F401 - the request limits, re-exported for the server
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPTS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID_LIST,
)
from .errors import bad_request


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
    stop: str | list[str] | None = None
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
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (structured_outputs/request.py turns them into one constraint).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    # vLLM extras: the output's token ids, the response id, which end truncation keeps.
    return_token_ids: bool | None = None
    request_id: str | None = None
    truncation_side: str | None = None
    # vLLM fields that would change the output but that fastserve does not implement: a
    # request setting them is refused (a 400 naming the field), never silently ignored.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    logprob_token_ids: list[int] | None = None
    priority: int = 0
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    watermarking: Any = None
    prompt_embeds: Any = None
    audio: Any = None
    modalities: Any = None

    def structured_output_fields(self) -> dict[str, Any]:
        return {
            "response_format": self.response_format,
            "structured_outputs": self.structured_outputs,
            "guided": {f: getattr(self, f) for f in _GUIDED},
        }

    def check_common(self) -> None:
        for name, is_set, why in _UNSUPPORTED:
            value = getattr(self, name)
            if is_set(value):
                raise bad_request(f"{name} is not supported by fastserve ({why}); leave it out", name)
        if self.truncation_side not in (None, "left", "right"):
            raise bad_request("truncation_side must be 'left' or 'right'", "truncation_side")
        for name in ("n", "best_of"):
            value = getattr(self, name)
            if value is not None and value > MAX_N:
                raise bad_request(
                    f"{name} is {value}; the most one request may ask for is {MAX_N}: send several requests instead",
                    name,
                )
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        if any(len(x) > MAX_STOP_STRING_CHARS for x in stop):
            raise bad_request(f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters; shorten it", "stop")
        for name in ("stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_TOKEN_ID_LIST:
                raise bad_request(f"{name} holds {len(value)} entries; at most {MAX_TOKEN_ID_LIST} are allowed", name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1
        ):
            raise bad_request(
                "truncate_prompt_tokens must be a positive number of tokens (or -1 for the model's maximum length)",
                "truncate_prompt_tokens",
            )
        # best_of picks the n best only once all are finished: nothing to stream before.
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must equal n when streaming", "best_of")
        if self.stream and self.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is only returned without streaming", "prompt_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}", "prompt_logprobs"
            )


_GUIDED = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
)
# (field, is it set, why it cannot be honoured)
_UNSUPPORTED = (
    ("use_beam_search", lambda v: v is True, "no beam search"),
    ("length_penalty", lambda v: v != 1.0, "it applies to beam search only"),
    ("logprob_token_ids", lambda v: v is not None, "use logprobs / top_logprobs"),
    ("priority", lambda v: v != 0, "no priority scheduling"),
    ("vllm_xargs", lambda v: bool(v), "no custom extensions"),
    ("repetition_detection", lambda v: v is not None, "no repetition detection"),
    ("watermarking", lambda v: bool(v), "no watermarking"),
    ("prompt_embeds", lambda v: v is not None, "prompts are text or token ids"),
    ("audio", lambda v: v is not None, "text output only"),
    ("modalities", lambda v: v is not None and list(v) != ["text"], "text output only"),
)

PromptItem = str | int | list[int]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[PromptItem]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported; leave it out", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids. The four OpenAI forms: a string, a list
        of strings, a list of token ids, a list of token-id lists; mixing them is a 400."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if len(p) > MAX_PROMPTS and not all(isinstance(x, int) for x in p):
            raise bad_request(
                f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS} go in one request: split the batch", "prompt"
            )
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) for x in p):
            for i, ids in enumerate(p):
                if not ids:
                    raise bad_request(f"prompt[{i}] is an empty list of token ids", f"prompt[{i}]")
            return [list(x) for x in p]
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists (not a mix)",
            "prompt",
        )


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content


def check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    for i, m in enumerate(messages):
        if m.role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(
                f"messages[{i}].role must be one of system, developer, user, assistant, tool (got {m.role!r})",
                f"messages[{i}].role",
            )
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}].content[{j}]: only text parts are supported (got type {part.type!r})",
                        f"messages[{i}].content[{j}].type",
                    )


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: list content is joined to one string, as vLLM does
    for text-only models; an assistant's tool-call arguments (JSON text on the wire) become
    objects, as vLLM passes them (templates write `arguments | tojson`); the reasoning is
    there under both names."""
    import json

    out = []
    for m in messages:
        d = {k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
        if isinstance(m.content, list):
            d["content"] = "\n".join(p.text or "" for p in m.content)
        elif m.content is None:
            d["content"] = ""
        reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
        if reasoning is not None:
            d["reasoning"] = d["reasoning_content"] = reasoning
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        call = {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
                    except ValueError:
                        pass
                calls.append(call)
            d["tool_calls"] = calls
        out.append(d)
    return out


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM extras: the template's reasoning switch, reasoning in the answer or not, RAG
    # documents for the template, echoing the last message.
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    documents: list[dict[str, Any]] | None = None
    echo: bool = False
    thinking_token_budget: Any = None
    return_prompt_text: bool | None = None
    # OpenAI's deprecated function calling: refused with a pointer to tools.
    functions: Any = None
    function_call: Any = None

    def check(self) -> None:
        self.check_common()
        check_messages(self.messages)
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise bad_request(
                    f"{name} (OpenAI's deprecated function calling) is not supported; use tools and tool_choice", name
                )
        if self.thinking_token_budget is not None:
            raise bad_request(
                "thinking_token_budget is not supported by fastserve; leave it out", "thinking_token_budget"
            )
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}", "top_logprobs"
                )
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request(
                "continue_final_message needs add_generation_prompt set to false", "continue_final_message"
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message needs the last message to be the assistant's", "continue_final_message"
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise bad_request("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")

    def wire_name(self, field: str) -> str:
        """The request field an offline (SamplingParams / engine) name stands for in this
        request: the logprobs count is top_logprobs, max_tokens is whichever of
        max_tokens / max_completion_tokens the client sent, the prompt is the messages."""
        if field == "logprobs":
            return "top_logprobs"
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field == "prompt":
            return "messages"
        return field

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


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


def decode(body: bytes, type_):
    """The request struct of a JSON body, its own rules checked (`check()`); a 400 naming the
    field otherwise."""
    from .errors import from_validation_error

    try:
        req = msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise from_validation_error(e) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"The request body is not valid JSON ({e}); send a JSON object.") from None
    except UnicodeDecodeError as e:  # msgspec checks strings' UTF-8 only as it decodes them
        raise bad_request(
            f"The request body is not valid UTF-8 ({e.reason} at byte {e.start}); send UTF-8 JSON."
        ) from None
    except RecursionError:
        raise bad_request("The request body nests JSON too deeply; flatten it.") from None
    return req


async def read_request(request, type_):
    """decode() of an aiohttp request's body, kept on the request (state.REQUEST) so that an
    error raised later names its field as this request's wire format does."""
    from .state import REQUEST

    req = decode(await request.read(), type_)
    request[REQUEST] = req
    if hasattr(req, "check"):
        req.check()
    return req
